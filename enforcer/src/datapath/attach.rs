//! Attaching the programs to interfaces: fresh links, adopted pinned
//! links, detaching, renames; and removing everything pinned.

use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, SchedClassifierLinkId, TcAttachType};
use aya::programs::xdp::{XdpLink, XdpLinkId};
use aya::programs::{XdpMode, tc};

use crate::pins;

use super::{Datapath, DatapathError};

/// The programs on one interface.
pub(super) struct Attachment {
    pub(super) name: String,
    pub(super) index: u32,
    /// Which program judges incoming packets there.
    pub(super) ingress: IngressHook,
    /// The ingress link while the program owns it (not pinned).
    pub(super) owned: Option<OwnedIngress>,
    /// The egress link while the program owns it (not pinned).
    pub(super) egress: Option<SchedClassifierLinkId>,
}

/// An ingress link owned by its program.
pub(super) enum OwnedIngress {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
}

/// The three programs that attach to interfaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProgramSlot {
    Xdp,
    TcIngress,
    TcEgress,
}

impl ProgramSlot {
    fn label(self) -> &'static str {
        match self {
            Self::Xdp => "XDP",
            Self::TcIngress => "TC ingress",
            Self::TcEgress => "TC egress",
        }
    }
}

impl Attachment {
    /// Detaches what the programs own and removes the pins of the rest.
    fn detach(self, datapath: &mut Datapath, root: Option<&Path>) {
        match self.owned {
            Some(OwnedIngress::Xdp(id)) => {
                let _ = datapath.xdp().map(|p| p.detach(id));
            }
            Some(OwnedIngress::Tc(id)) => {
                let _ = datapath.ingress_classifier().map(|p| p.detach(id));
            }
            None => {}
        }
        if let Some(id) = self.egress {
            let _ = datapath.classifier().map(|p| p.detach(id));
        }
        if let Some(root) = root {
            pins::remove_links(root, &self.name);
        }
    }
}

/// How the XDP program is attached to an interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum XdpAttach {
    /// In the driver where it supports XDP, else generic: the kernel's choice.
    #[default]
    Auto,
    /// In the driver only; attaching fails where the driver cannot.
    Native,
    /// After the socket buffer is built (generic XDP). Cheaper than native
    /// on veth, whose native XDP copies every packet the stack sent it.
    Generic,
}

/// Where incoming packets are judged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IngressHook {
    /// XDP: before the kernel builds a socket buffer, where the driver
    /// supports it; the fast choice on physical NICs.
    #[default]
    Xdp,
    /// TC ingress (tcx): after the socket buffer is built, where nftables'
    /// ingress hook also runs; the cheaper choice on veth, whose XDP copies
    /// every packet the sending stack built.
    Tc,
}

impl Datapath {
    /// Where later [`Datapath::attach`] calls judge incoming packets
    /// (adopted pinned links keep the hook they were made with).
    pub fn set_ingress_hook(&mut self, hook: IngressHook) {
        self.ingress_hook = hook;
    }

    /// How later [`Datapath::attach`] calls attach XDP (adopted pinned
    /// links keep the mode they were made with).
    pub fn set_xdp_attach(&mut self, mode: XdpAttach) {
        self.xdp_attach = mode;
    }

    /// Attaches the ingress program (XDP, or TC ingress as
    /// [`Datapath::set_ingress_hook`] says) and the TC egress program (tcx
    /// where the kernel has it) to `interface`.
    pub fn attach(&mut self, interface: &str) -> Result<(), DatapathError> {
        self.attach_pinned(interface, None).map(drop)
    }

    /// As [`Datapath::attach`], keeping the links pinned under `root/links`
    /// so they outlive the daemon. Where a link is already pinned there (an
    /// earlier daemon's), its program is replaced atomically instead: the
    /// interface is never unprotected. A pinned link that can no longer be
    /// updated (its interface was deleted and re-created) is replaced by a
    /// fresh one. Returns whether links were adopted; attaching an
    /// interface that is already attached does nothing.
    pub fn attach_pinned(&mut self, interface: &str, root: Option<&Path>) -> Result<bool, DatapathError> {
        let index = crate::interfaces::interface_index(interface)
            .ok_or_else(|| DatapathError::NoInterface { interface: interface.to_owned() })?;
        if let Some(existing) = self.attachments.iter_mut().find(|a| a.index == index) {
            interface.clone_into(&mut existing.name);
            return Ok(false);
        }
        // Kernels without tcx need a clsact qdisc; an existing one is fine.
        let _ = tc::qdisc_add_clsact(interface);
        let pin = |kind| root.map(|r| pins::link_pin(r, kind, interface));
        let (xdp_pin, tcin_pin, tc_pin) = (pin("xdp"), pin("tcin"), pin("tc"));
        let mut adopted = true;
        let ingress = if self.adopt(ProgramSlot::Xdp, xdp_pin.as_deref(), interface)? {
            (IngressHook::Xdp, None)
        } else if self.adopt(ProgramSlot::TcIngress, tcin_pin.as_deref(), interface)? {
            (IngressHook::Tc, None)
        } else {
            adopted = false;
            (self.ingress_hook, self.attach_fresh_ingress(interface, xdp_pin.as_deref(), tcin_pin.as_deref())?)
        };
        let egress = if self.adopt(ProgramSlot::TcEgress, tc_pin.as_deref(), interface)? {
            None
        } else {
            match self.attach_fresh_egress(interface, tc_pin.as_deref()) {
                Ok(egress) => egress,
                Err(error) => {
                    // Never leave an interface half attached by this call;
                    // an adopted ingress link keeps enforcing as before.
                    if !adopted {
                        let half = Attachment {
                            name: interface.to_owned(),
                            index,
                            ingress: ingress.0,
                            owned: ingress.1,
                            egress: None,
                        };
                        half.detach(self, root);
                    }
                    return Err(error);
                }
            }
        };
        self.attachments.push(Attachment {
            name: interface.to_owned(),
            index,
            ingress: ingress.0,
            owned: ingress.1,
            egress,
        });
        Ok(adopted)
    }

    /// Takes over the link pinned at `pin`, if there is one, by replacing
    /// its program with this daemon's atomically. A pin whose link cannot
    /// be updated (defunct) is removed and `false` returned, so a fresh
    /// link is attached instead.
    fn adopt(&mut self, slot: ProgramSlot, pin: Option<&Path>, interface: &str) -> Result<bool, DatapathError> {
        let Some(pin) = pin.filter(|p| p.exists()) else { return Ok(false) };
        let link = PinnedLink::from_pin(pin).map(FdLink::from);
        let adopted = match (slot, link) {
            (_, Err(error)) => Err(error.to_string()),
            (ProgramSlot::Xdp, Ok(link)) => match XdpLink::try_from(link) {
                Ok(link) => {
                    let program = self.xdp()?;
                    program
                        .attach_to_link(link)
                        .and_then(|id| program.take_link(id).map(drop))
                        .map_err(|e| e.to_string())
                }
                Err(error) => Err(error.to_string()),
            },
            (ProgramSlot::TcIngress | ProgramSlot::TcEgress, Ok(link)) => match SchedClassifierLink::try_from(link) {
                Ok(link) => {
                    let program =
                        if slot == ProgramSlot::TcIngress { self.ingress_classifier()? } else { self.classifier()? };
                    program
                        .attach_to_link(link)
                        .and_then(|id| program.take_link(id).map(drop))
                        .map_err(|e| e.to_string())
                }
                Err(error) => Err(error.to_string()),
            },
        };
        match adopted {
            // The pin keeps the link; this daemon's program now runs in it.
            Ok(()) => Ok(true),
            Err(why) => {
                log::warn!(
                    "the {} link of `{interface}` pinned at {} cannot be taken over ({why}); attaching a fresh one",
                    slot.label(),
                    pin.display()
                );
                let _ = std::fs::remove_file(pin);
                self.repairs += 1;
                Ok(false)
            }
        }
    }

    fn attach_fresh_ingress(
        &mut self,
        interface: &str,
        xdp_pin: Option<&Path>,
        tcin_pin: Option<&Path>,
    ) -> Result<Option<OwnedIngress>, DatapathError> {
        let attach_error = |hook| move |source| DatapathError::Attach { hook, interface: interface.to_owned(), source };
        if self.ingress_hook == IngressHook::Tc {
            let program = self.ingress_classifier()?;
            let id = program.attach(interface, TcAttachType::Ingress).map_err(attach_error("TC ingress"))?;
            let Some(path) = tcin_pin else { return Ok(Some(OwnedIngress::Tc(id))) };
            pin_link(program.take_link(id).map_err(attach_error("TC ingress"))?, path)?;
        } else {
            let mode = match self.xdp_attach {
                XdpAttach::Auto => XdpMode::Default,
                XdpAttach::Native => XdpMode::Driver,
                XdpAttach::Generic => XdpMode::Skb,
            };
            let program = self.xdp()?;
            let id = program.attach(interface, mode).map_err(attach_error("XDP"))?;
            let Some(path) = xdp_pin else { return Ok(Some(OwnedIngress::Xdp(id))) };
            pin_link(program.take_link(id).map_err(attach_error("XDP"))?, path)?;
        }
        Ok(None)
    }

    fn attach_fresh_egress(
        &mut self,
        interface: &str,
        tc_pin: Option<&Path>,
    ) -> Result<Option<SchedClassifierLinkId>, DatapathError> {
        let attach_error =
            |source| DatapathError::Attach { hook: "TC egress", interface: interface.to_owned(), source };
        let program = self.classifier()?;
        let id = program.attach(interface, TcAttachType::Egress).map_err(attach_error)?;
        let Some(path) = tc_pin else { return Ok(Some(id)) };
        pin_link(program.take_link(id).map_err(attach_error)?, path)?;
        Ok(None)
    }

    /// Detaches both programs from the interface with index `index` and
    /// removes their pins under `root`; forgetting an interface that is
    /// gone is the same call. Returns its name if it was attached.
    pub fn detach(&mut self, index: u32, root: Option<&Path>) -> Option<String> {
        let position = self.attachments.iter().position(|a| a.index == index)?;
        let attachment = self.attachments.remove(position);
        let name = attachment.name.clone();
        attachment.detach(self, root);
        Some(name)
    }

    /// Records that the interface with index `index` is now called `name`,
    /// moving its pins. Returns the old name if it changed.
    pub fn renamed(&mut self, index: u32, name: &str, root: Option<&Path>) -> Option<String> {
        let attachment = self.attachments.iter_mut().find(|a| a.index == index && a.name != name)?;
        let old = std::mem::replace(&mut attachment.name, name.to_owned());
        if let Some(root) = root
            && let Err(error) = pins::rename_links(root, &old, name)
        {
            log::warn!("moving the pins of `{old}` to `{name}` failed: {error}");
        }
        Some(old)
    }

    /// Interfaces the programs are attached to, in the order attached.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attachments.iter().map(|a| a.name.as_str())
    }

    /// (ifindex, name) of every attached interface.
    pub fn attached_indexes(&self) -> impl Iterator<Item = (u32, &str)> {
        self.attachments.iter().map(|a| (a.index, a.name.as_str()))
    }

    /// How many interfaces each hook is attached to, by metrics label
    /// (`xdp`, `tc_ingress`, `tc_egress`).
    #[must_use]
    pub fn hook_counts(&self) -> [(&'static str, usize); 3] {
        let xdp = self.attachments.iter().filter(|a| a.ingress == IngressHook::Xdp).count();
        let all = self.attachments.len();
        [("xdp", xdp), ("tc_ingress", all - xdp), ("tc_egress", all)]
    }

    /// Pinned links found defunct and replaced while attaching, since load.
    #[must_use]
    pub fn link_repairs(&self) -> u64 {
        self.repairs
    }
}

/// Pins a link (XDP or TC, as its program handed it over) at `path`; the
/// pin keeps it attached after the daemon exits.
fn pin_link<L>(link: L, path: &Path) -> Result<(), DatapathError>
where
    FdLink: TryFrom<L, Error = LinkError>,
{
    let link = FdLink::try_from(link).map_err(|source| DatapathError::Link { path: path.into(), source })?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| DatapathError::Pin { path: dir.to_path_buf(), source })?;
    }
    link.pin(path).map_err(|error| DatapathError::Pin {
        path: path.to_path_buf(),
        source: std::io::Error::other(error.to_string()),
    })?;
    Ok(())
}

/// Removes everything pinned under `root`: links first (each detached
/// before its pin goes), then the maps. Returns what was removed.
pub fn uninstall(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for dir in ["links", "maps"] {
        let dir = root.join(dir);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            if dir.ends_with("links") {
                pins::detach_and_unpin(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
            removed.push(path);
        }
        std::fs::remove_dir(&dir)?;
    }
    if root.exists() {
        std::fs::remove_dir(root)?;
    }
    Ok(removed)
}
