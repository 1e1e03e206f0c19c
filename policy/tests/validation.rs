//! One test per kind of policy error (and warning): each asserts the exact
//! position and the message, because operators act on both.

use policy::{Diagnostic, PolicyError, parse_str};

const HEADER: &str = "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata:\n  name: test\nspec:\n";

/// Parses `HEADER + body` and returns its problems as `line:col: message`.
fn problems(body: &str) -> Vec<String> {
    match parse_str("p.yaml", &format!("{HEADER}{body}")) {
        Ok(_) => Vec::new(),
        Err(PolicyError::Invalid { diagnostics }) => diagnostics.iter().map(Diagnostic::to_string).collect(),
        Err(other) => panic!("unexpected error {other}"),
    }
}

fn assert_one(body: &str, expected_prefix: &str, expected_text: &str) {
    let found = problems(body);
    assert_eq!(found.len(), 1, "expected exactly one problem, got {found:#?}");
    assert!(found[0].starts_with(expected_prefix), "{} does not start with {expected_prefix}", found[0]);
    assert!(found[0].contains(expected_text), "{} does not contain {expected_text}", found[0]);
}

const IDENTITIES: &str = "  identities:\n    - name: a\n      labels: {tier: a}\n      addresses: [\"10.0.1.0/24\"]\n    - name: b\n      labels: {tier: b}\n      addresses: [\"10.0.2.10\", \"fd00::/64\"]\n";

#[test]
fn valid_policy_parses() {
    let body = format!(
        "{IDENTITIES}  rules:\n    - name: a-to-b\n      from: [{{identity: a}}]\n      to: [{{labels: {{tier: b}}}}]\n      ports: [\"80/tcp\", \"1000-2000/udp\", \"icmp\"]\n"
    );
    let policy = parse_str("p.yaml", &format!("{HEADER}{body}")).unwrap();
    assert_eq!(policy.identities.len(), 2);
    assert_eq!(policy.rules.len(), 1);
    assert_eq!(policy.rules[0].ports.as_ref().unwrap().len(), 3);
}

#[test]
fn yaml_syntax_error() {
    assert_one("  identities: [\n", "p.yaml:7:", "invalid YAML");
}

#[test]
fn unknown_field_in_identity() {
    let found = problems("  identities:\n    - name: a\n      adresses: [\"10.0.0.1\"]\n");
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(found[0].starts_with("p.yaml:7:7: the identity is missing required field `addresses`"), "{}", found[0]);
    assert_eq!(found[1], "p.yaml:8:7: unknown field `adresses` in an identity; did you mean `addresses`?");
}

#[test]
fn unknown_field_in_rule() {
    let body = format!(
        "{IDENTITIES}  rules:\n    - name: r\n      from: [{{identity: a}}]\n      to: [{{identity: b}}]\n      port: [\"80/tcp\"]\n"
    );
    assert_one(&body, "p.yaml:17:7:", "unknown field `port` in a rule; did you mean `ports`?");
}

#[test]
fn unknown_top_level_field() {
    assert_one("  identities: []\nstatus: {}\n", "p.yaml:7:1:", "unknown field `status` in a policy document");
}

#[test]
fn missing_required_field() {
    assert_one("  identities:\n    - name: a\n", "p.yaml:7:7:", "missing required field `addresses`");
}

#[test]
fn wrong_api_version_and_kind() {
    let found = problems_of("apiVersion: bulkhead/v9\nkind: NetworkPolicy\nmetadata: {name: x}\nspec: {}\n");
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(found[0].starts_with("p.yaml:1:13: unsupported apiVersion `bulkhead/v9`"), "{}", found[0]);
    assert!(found[1].starts_with("p.yaml:2:7: unsupported kind `NetworkPolicy`"), "{}", found[1]);
}

/// The custom resource's apiVersion reads the same document as the file
/// format's: an object fetched from a cluster can be checked as it is.
#[test]
fn the_custom_resource_api_version_is_accepted() {
    let body = format!("{IDENTITIES}  rules: []\n");
    let file = parse_str("p.yaml", &format!("{HEADER}{body}")).unwrap();
    let resource = parse_str("p.yaml", &format!("{}{body}", HEADER.replace("bulkhead/v1", "bulkhead.dev/v1"))).unwrap();
    assert_eq!(format!("{file:?}"), format!("{resource:?}"));
    let found = problems_of("apiVersion: bulkhead.dev/v2\nkind: SegmentPolicy\nmetadata: {name: x}\nspec: {}\n");
    assert_eq!(
        found,
        ["p.yaml:1:13: unsupported apiVersion `bulkhead.dev/v2`; use `bulkhead/v1` or `bulkhead.dev/v1`"]
    );
}

/// A custom resource as the API server serves it, JSON (which is YAML),
/// reads as the same policy written as a file: the Kubernetes source can
/// hand the engine the object's text as it is.
#[test]
fn a_policy_as_the_api_serves_it_in_json_reads_the_same() {
    let yaml = format!(
        "{HEADER}{IDENTITIES}  rules:\n    - name: a-to-b\n      from: [{{identity: a}}]\n      to: [{{labels: {{tier: b}}, cidr: null}}]\n      ports: [\"80/tcp\"]\n"
    )
    .replace("apiVersion: bulkhead/v1", "apiVersion: bulkhead.dev/v1")
    .replace(", cidr: null", "");
    let json = r#"{
  "apiVersion": "bulkhead.dev/v1",
  "kind": "SegmentPolicy",
  "metadata": {"name": "test", "uid": "4f1c", "resourceVersion": "12", "generation": 1},
  "spec": {
    "identities": [
      {"name": "a", "labels": {"tier": "a"}, "addresses": ["10.0.1.0/24"]},
      {"name": "b", "labels": {"tier": "b"}, "addresses": ["10.0.2.10", "fd00::/64"]}
    ],
    "rules": [
      {"name": "a-to-b", "from": [{"identity": "a"}], "to": [{"labels": {"tier": "b"}}], "ports": ["80/tcp"]}
    ]
  }
}"#;
    let from_yaml = parse_str("p.yaml", &yaml).unwrap();
    let metadata_as_kept = json.replace(", \"uid\": \"4f1c\", \"resourceVersion\": \"12\", \"generation\": 1", "");
    let from_json = parse_str("p.yaml", &metadata_as_kept).unwrap();
    let shape = |policy: &policy::Policy| {
        let names: Vec<_> =
            policy.identities.iter().map(|i| (i.name.clone(), i.labels.clone(), i.addresses.len())).collect();
        let rules: Vec<_> =
            policy.rules.iter().map(|r| (r.name.clone(), format!("{:?} {:?}", r.to[0].selector, r.ports))).collect();
        (policy.documents.clone(), names, rules)
    };
    assert_eq!(shape(&from_json), shape(&from_yaml));
    // The API's own metadata fields are not the policy's: named, as any
    // unknown field is, so the source strips them first.
    let found = problems_of(json);
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(found[0].contains("unknown field `uid` in metadata"), "{found:#?}");
}

fn problems_of(text: &str) -> Vec<String> {
    parse_str("p.yaml", text).unwrap_err().diagnostics().iter().map(ToString::to_string).collect()
}

#[test]
fn duplicate_identity_name() {
    let body = "  identities:\n    - name: a\n      addresses: [\"10.0.0.1\"]\n    - name: a\n      addresses: [\"10.0.0.2\"]\n";
    assert_one(body, "p.yaml:9:7:", "duplicate identity name `a` (first declared at p.yaml:7:7)");
}

#[test]
fn duplicate_rule_name_across_files() {
    let rule = "  rules:\n    - name: r\n      from: [{identity: world}]\n      to: [{identity: world}]\n";
    let sources = [
        policy::Source { name: "one.yaml".into(), text: format!("{HEADER}{rule}") },
        policy::Source { name: "two.yaml".into(), text: format!("{HEADER}{rule}") },
    ];
    let error = policy::parse_sources(&sources).unwrap_err();
    let found: Vec<String> = error.diagnostics().iter().map(ToString::to_string).collect();
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].starts_with("two.yaml:7:7: duplicate rule name `r` (first declared at one.yaml:7:7)"),
        "{}",
        found[0]
    );
}

#[test]
fn reserved_identity_name() {
    assert_one(
        "  identities:\n    - name: world\n      addresses: [\"10.0.0.1\"]\n",
        "p.yaml:7:7:",
        "identity name `world` is reserved",
    );
}

#[test]
fn overlapping_identity_addresses() {
    let body = "  identities:\n    - name: a\n      addresses: [\"10.0.0.0/16\"]\n    - name: b\n      addresses: [\"10.0.5.7\"]\n";
    assert_one(
        body,
        "p.yaml:10:19:",
        "address 10.0.5.7/32 of identity `b` overlaps 10.0.0.0/16 of identity `a` (at p.yaml:8:19)",
    );
}

#[test]
fn duplicate_address_in_one_identity() {
    let body = "  identities:\n    - name: a\n      addresses: [\"10.0.0.1\", \"10.0.0.1/32\"]\n";
    assert_one(body, "p.yaml:8:31:", "address 10.0.0.1/32 is listed twice in identity `a`");
}

/// Parses `HEADER + body`, which must be valid, and returns its warnings
/// as `file:line:col: message`.
fn warnings(body: &str) -> Vec<String> {
    let policy = parse_str("p.yaml", &format!("{HEADER}{body}")).expect("valid: selecting nothing is no error");
    policy::warnings(&policy).iter().map(Diagnostic::to_string).collect()
}

fn assert_one_warning(body: &str, expected_prefix: &str, expected_text: &str) {
    let found = warnings(body);
    assert_eq!(found.len(), 1, "expected exactly one warning, got {found:#?}");
    assert!(found[0].starts_with(expected_prefix), "{} does not start with {expected_prefix}", found[0]);
    assert!(found[0].contains(expected_text), "{} does not contain {expected_text}", found[0]);
}

/// A rule may come before the identity it names (as a network policy
/// before its pods): valid, with a warning.
#[test]
fn identity_selector_matches_nothing_yet() {
    let body =
        format!("{IDENTITIES}  rules:\n    - name: r\n      from: [{{identity: c}}]\n      to: [{{identity: b}}]\n");
    assert_one_warning(&body, "p.yaml:15:15:", "rule `r` names identity `c`, which is not declared");
}

#[test]
fn label_selector_matches_nothing_yet() {
    let body = format!(
        "{IDENTITIES}  rules:\n    - name: r\n      from: [{{identity: a}}]\n      to: [{{labels: {{tier: c}}}}]\n"
    );
    assert_one_warning(&body, "p.yaml:16:13:", "label selector {tier=c} in rule `r` matches no identity");
}

#[test]
fn selectors_that_match_give_no_warning() {
    let body = format!(
        "{IDENTITIES}  rules:\n    - name: r\n      from: [{{identity: a}}, {{identity: world}}, {{identity: host}}]\n      to: [{{labels: {{tier: b}}}}, {{cidr: 10.9.0.0/16}}]\n"
    );
    assert_eq!(warnings(&body), Vec::<String>::new());
}

#[test]
fn bad_cidr() {
    assert_one(
        "  identities:\n    - name: a\n      addresses: [\"10.0.0.300/24\"]\n",
        "p.yaml:8:19:",
        "`10.0.0.300/24` is not a valid IPv4/IPv6 address or CIDR",
    );
}

#[test]
fn cidr_with_host_bits() {
    assert_one(
        "  identities:\n    - name: a\n      addresses: [\"10.0.1.5/24\"]\n",
        "p.yaml:8:19:",
        "did you mean 10.0.1.0/24?",
    );
}

#[test]
fn except_outside_cidr() {
    let body = "  rules:\n    - name: r\n      from: [{cidr: \"10.0.0.0/16\", except: [\"10.1.0.0/24\"]}]\n      to: [{identity: world}]\n";
    assert_one(body, "p.yaml:8:45:", "except entry 10.1.0.0/24 is not strictly inside cidr 10.0.0.0/16");
}

fn rule_with_ports(ports: &str) -> String {
    format!(
        "{IDENTITIES}  rules:\n    - name: r\n      from: [{{identity: a}}]\n      to: [{{identity: b}}]\n      ports: [{ports}]\n"
    )
}

#[test]
fn port_out_of_range() {
    assert_one(
        &rule_with_ports("\"65536/tcp\""),
        "p.yaml:17:15:",
        "port in `65536/tcp` is out of range; ports go from 1 to 65535",
    );
    assert_one(&rule_with_ports("\"0/udp\""), "p.yaml:17:15:", "out of range");
}

#[test]
fn reversed_port_range() {
    assert_one(
        &rule_with_ports("\"90-80/tcp\""),
        "p.yaml:17:15:",
        "port range `90-80/tcp` is reversed; write 80-90/tcp",
    );
}

#[test]
fn unknown_protocol() {
    assert_one(&rule_with_ports("\"80/sctp\""), "p.yaml:17:15:", "unknown protocol `sctp` in `80/sctp`");
}

#[test]
fn port_on_icmp() {
    assert_one(&rule_with_ports("\"8/icmp\""), "p.yaml:17:15:", "icmp has no ports; write just `icmp`");
}

#[test]
fn not_a_port() {
    assert_one(&rule_with_ports("\"http/tcp\""), "p.yaml:17:15:", "`http/tcp` is not a port");
}

#[test]
fn unknown_action() {
    let body = format!(
        "{IDENTITIES}  rules:\n    - name: r\n      action: reject\n      from: [{{identity: a}}]\n      to: [{{identity: b}}]\n"
    );
    assert_one(&body, "p.yaml:15:15:", "unknown action `reject`; use `allow` or `deny`");
}

#[test]
fn peer_with_two_selectors() {
    let body = format!(
        "{IDENTITIES}  rules:\n    - name: r\n      from: [{{identity: a, cidr: \"10.0.0.0/8\"}}]\n      to: [{{identity: b}}]\n"
    );
    assert_one(&body, "p.yaml:15:15:", "a peer needs exactly one of `identity`, `labels` or `cidr`");
}

#[test]
fn empty_from_list() {
    let body = format!("{IDENTITIES}  rules:\n    - name: r\n      from: []\n      to: [{{identity: b}}]\n");
    assert_one(&body, "p.yaml:15:13:", "`from` is empty, so the rule could never match");
}

#[test]
fn wrong_type() {
    assert_one(
        "  identities:\n    - name: a\n      addresses: \"10.0.0.1\"\n",
        "p.yaml:8:18:",
        "addresses must be a list, found a scalar",
    );
}

#[test]
fn invalid_name() {
    assert_one(
        "  identities:\n    - name: Web Tier\n      addresses: [\"10.0.0.1\"]\n",
        "p.yaml:7:13:",
        "identity name `Web Tier` is not a valid name",
    );
}

#[test]
fn repeated_yaml_key() {
    assert_one(
        "  identities:\n    - name: a\n      name: b\n      addresses: [\"10.0.0.1\"]\n",
        "p.yaml:8:7:",
        "field `name` appears twice",
    );
}

#[test]
fn every_problem_is_reported_in_one_run() {
    let body = format!(
        "{IDENTITIES}  rules:\n    - name: r\n      from: [{{identity: a}}]\n      to: [{{identity: b}}]\n      ports: [\"99999/tcp\", \"1/gre\"]\n    - name: r\n      from: [{{identity: a}}]\n      to: [{{identity: b}}]\n"
    );
    assert_eq!(problems(&body).len(), 3, "{:#?}", problems(&body));
}

#[test]
fn empty_directory_is_an_error() {
    let dir = std::env::temp_dir().join(format!("bulkhead-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let error = policy::load(std::slice::from_ref(&dir)).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(error.to_string().contains("no policy files (*.yaml, *.yml) found"), "{error}");
}

#[test]
fn bad_expiry() {
    let body = format!(
        "{IDENTITIES}  rules:\n    - name: r\n      from: [{{identity: a}}]\n      to: [{{identity: b}}]\n      expires: \"next tuesday\"\n"
    );
    assert_one(&body, "p.yaml:17:16:", "`next tuesday` is not an RFC 3339 time");
}
