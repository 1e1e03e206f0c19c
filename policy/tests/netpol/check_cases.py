#!/usr/bin/env python3
"""Check the NetworkPolicy truth-table case files in cases/ (format: README.md).

Checks every case file's header (keys, case name = file name, probes, 9x9
matrices of "." and "X" with an all-"." diagonal, label overrides), the IP
tokens, a few API-server rules the JSON schema cannot express (endPort), that
README.md lists every file, and validates every NetworkPolicy document with
kubernetes-validate --strict against the Kubernetes schema the project's
manifest tests use.

Usage: check_cases.py [--validator PATH] [--no-validate]
Exit status 0 when everything passes.
"""
import argparse
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = os.path.join(HERE, "cases")
README = os.path.join(HERE, "README.md")
KUBERNETES_VERSION = "1.32.0"  # as tests/tests/manifests.rs

NAMESPACES = ["x", "y", "z"]
PODS = [f"{n}/{p}" for n in NAMESPACES for p in "abc"]
HEADER_KEYS = {"case", "upstream", "derived", "namespaceLabels", "podLabels", "probes"}
FILE_RE = re.compile(r"^(\d{3})-([a-z0-9]+(?:-[a-z0-9]+)*)\.yaml$")
IP_TOKEN = re.compile(r"^IP\(([xyz])/([abc])\)/32$")
NET_TOKEN = re.compile(r"^NET\(([xyz])/([abc]),(\d{1,2})\)$")

errors = []


def err(where, msg):
    errors.append(f"{where}: {msg}")


def str_map(v):
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


def check_cidr(where, s):
    if not isinstance(s, str):
        err(where, f"CIDR {s!r} is not a string")
    elif "IP(" in s or "NET(" in s:
        m = NET_TOKEN.match(s)
        if not IP_TOKEN.match(s) and not (m and 0 <= int(m.group(3)) <= 32):
            err(where, f"malformed IP token {s!r}")
    else:
        try:
            ipaddress.ip_network(s, strict=False)
        except ValueError:
            err(where, f"{s!r} is neither an IP token nor a CIDR")


def check_header(where, name, h):
    if not isinstance(h, dict):
        return err(where, "first document is not a mapping")
    for k in set(h) - HEADER_KEYS:
        err(where, f"unknown header key {k!r}")
    if h.get("case") != name:
        err(where, f"case {h.get('case')!r} differs from the file name's {name!r}")
    if not isinstance(h.get("upstream"), str) or not h["upstream"]:
        err(where, "upstream must be a non-empty string")
    if "derived" in h and (not isinstance(h["derived"], str) or not h["derived"]):
        err(where, "derived, when present, must be a non-empty string")
    nsl = h.get("namespaceLabels", {})
    if not isinstance(nsl, dict) or any(k not in NAMESPACES or not str_map(v) for k, v in nsl.items()):
        err(where, "namespaceLabels must map x/y/z to string->string labels")
    pl = h.get("podLabels", {})
    if not isinstance(pl, dict) or any(k not in PODS or not str_map(v) for k, v in pl.items()):
        err(where, "podLabels must map x/a..z/c to string->string labels")
    probes = h.get("probes")
    if not isinstance(probes, list) or not probes:
        return err(where, "probes must be a non-empty list")
    seen = set()
    for i, p in enumerate(probes):
        pw = f"{where} probe {i}"
        if not isinstance(p, dict) or set(p) != {"protocol", "port", "matrix"}:
            err(pw, "must have exactly protocol, port, matrix")
            continue
        if p["protocol"] not in ("TCP", "UDP"):
            err(pw, f"protocol {p['protocol']!r} is not TCP or UDP")
        port = p["port"]
        if isinstance(port, bool) or not (isinstance(port, int) and 1 <= port <= 65535 or isinstance(port, str) and port):
            err(pw, f"port {port!r} is neither 1..65535 nor a name")
        key = (p["protocol"], port)
        if key in seen:
            err(pw, f"{key} probed twice")
        seen.add(key)
        m = p["matrix"]
        if not isinstance(m, list) or len(m) != 9:
            err(pw, "matrix must be a list of 9 strings")
            continue
        for r, row in enumerate(m):
            if not isinstance(row, str) or not re.fullmatch(r"[.X]{9}", row):
                err(pw, f"matrix row {r} {row!r} is not 9 characters of '.'/'X'")
            elif row[r] != ".":
                err(pw, f"matrix diagonal at {PODS[r]} must be '.' (loopback is always allowed)")


def walk_ports(where, rules):
    for rule in rules or []:
        for peer in (rule or {}).get("from", []) + (rule or {}).get("to", []):
            ib = (peer or {}).get("ipBlock")
            if ib:
                check_cidr(where, ib.get("cidr"))
                for e in ib.get("except") or []:
                    check_cidr(where, e)
        for p in (rule or {}).get("ports") or []:
            if "endPort" in p:
                if not isinstance(p.get("port"), int):
                    err(where, "endPort needs a numeric port")
                elif p["endPort"] < p["port"]:
                    err(where, "endPort is below port")
            if isinstance(p.get("port"), str) and len(p["port"]) > 15:
                err(where, f"port name {p['port']!r} is longer than 15 characters")


def check_policy(where, doc, names):
    if not isinstance(doc, dict):
        return err(where, "policy document is not a mapping")
    if doc.get("apiVersion") != "networking.k8s.io/v1" or doc.get("kind") != "NetworkPolicy":
        err(where, "must be apiVersion networking.k8s.io/v1, kind NetworkPolicy")
    md = doc.get("metadata") or {}
    if md.get("namespace") not in NAMESPACES:
        err(where, f"metadata.namespace {md.get('namespace')!r} is not x, y or z")
    key = (md.get("namespace"), md.get("name"))
    if key in names:
        err(where, f"two policies named {key}")
    names.add(key)
    if "status" in doc:
        err(where, "status must not be present")
    spec = doc.get("spec") or {}
    walk_ports(where, spec.get("ingress"))
    walk_ports(where, spec.get("egress"))


def find_validator(given):
    if given:
        return given
    cands = [os.environ.get("KUBERNETES_VALIDATE"), os.path.join(HERE, "../../../target/venv/bin/kubernetes-validate")]
    try:  # a git worktree has no target/ of its own: try the main checkout's
        common = subprocess.run(["git", "-C", HERE, "rev-parse", "--path-format=absolute", "--git-common-dir"],
                                capture_output=True, text=True, check=True).stdout.strip()
        cands.append(os.path.join(os.path.dirname(common), "target/venv/bin/kubernetes-validate"))
    except (OSError, subprocess.CalledProcessError):
        pass
    cands.append(shutil.which("kubernetes-validate"))
    for c in cands:
        if c and os.access(c, os.X_OK):
            return os.path.normpath(c)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--validator", help="path of kubernetes-validate")
    ap.add_argument("--no-validate", action="store_true", help="skip kubernetes-validate")
    args = ap.parse_args()

    files = sorted(os.listdir(CASES))
    readme = open(README, encoding="utf-8").read()
    numbers = []
    tmp = tempfile.mkdtemp(prefix="netpol-cases-")
    to_validate = []
    for fn in files:
        where = f"cases/{fn}"
        m = FILE_RE.match(fn)
        if not m:
            err(where, "file name is not NNN-short-name.yaml")
            continue
        numbers.append(int(m.group(1)))
        if fn not in readme:
            err(where, "not listed in README.md")
        try:
            docs = list(yaml.safe_load_all(open(os.path.join(CASES, fn), encoding="utf-8")))
        except yaml.YAMLError as e:
            err(where, f"YAML error: {e}")
            continue
        if not docs:
            err(where, "empty file")
            continue
        check_header(where, m.group(2), docs[0])
        names = set()
        for i, doc in enumerate(docs[1:], 1):
            check_policy(f"{where} document {i + 1}", doc, names)
            path = os.path.join(tmp, f"{fn[:-5]}--{i + 1}.yaml")
            with open(path, "w", encoding="utf-8") as out:
                yaml.safe_dump(doc, out)
            to_validate.append(path)
    if numbers != list(range(1, len(numbers) + 1)):
        err("cases/", "file numbers must run 001, 002, ... without gaps or repeats")

    if not args.no_validate:
        validator = find_validator(args.validator)
        if not validator:
            err("kubernetes-validate", "not found (run `cargo xtask setup`, or pass --validator / --no-validate)")
        elif to_validate:
            res = subprocess.run([validator, "--strict", "--kubernetes-version", KUBERNETES_VERSION, "--quiet", *to_validate],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                err("kubernetes-validate", (res.stdout + res.stderr).strip().replace(tmp + "/", ""))
    shutil.rmtree(tmp)

    for e in errors:
        print("FAIL", e)
    print(f"{len(files)} case files, {len(to_validate)} NetworkPolicy documents: "
          f"{'FAILED, ' + str(len(errors)) + ' problem(s)' if errors else 'all checks passed'}"
          f"{' (schema validation skipped)' if args.no_validate else ''}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
