//! A schema-driven fuzz of the API from its own OpenAPI document: schemathesis (from the Python
//! package registry, installed by `cargo xtask setup` into target/schemathesis) generates valid
//! and invalid requests for every operation of `GET /v1/openapi.json` and sends them to a real
//! versed. Every check must hold: no 5xx; every status, content type, header and body as the
//! document declares; every request the document calls valid accepted (2xx, or 404/409 for ids
//! and conflicts it cannot know); every request it calls invalid refused with a 4xx. The rules
//! a schema cannot express are kept out of the generated data by tests/fuzz/verse_hooks.py. The
//! fuzz acts as the admin (the token versed made into its state directory; the hooks keep it
//! from revoking that token, whose id it sees in GET /v1/tokens); schemathesis checks on its own
//! that every operation but the two public ones refuses a request without the token or with a
//! wrong one (401).
use std::path::{Path, PathBuf};
use std::process::Command;

use tests::*;

/// Examples per operation and mode, and the seed: about a minute on a busy 2-core machine, the
/// same cases every run. `VERSE_FUZZ_EXAMPLES` and `VERSE_FUZZ_SEED` change them (to fuzz longer,
/// or elsewhere).
const MAX_EXAMPLES: &str = "40";
const SEED: &str = "7";

fn schemathesis() -> PathBuf {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/schemathesis/bin/schemathesis");
    assert!(
        bin.is_file(),
        "{} not found: the API fuzz needs schemathesis; `cargo xtask setup` (which `cargo xtask \
         test` runs) installs it",
        bin.display()
    );
    bin
}

#[test]
fn the_api_holds_to_its_openapi_document_under_a_schema_driven_fuzz() {
    let bin = schemathesis();
    // Limits out of the way, so that the fuzz reaches the handlers rather than 429s.
    let host = Host::start_with_config(Some(
        "[api]\nread_rate = 100000\nread_burst = 100000\nwrite_rate = 100000\nwrite_burst = 100000\n",
    ));
    // Something to find: a universe, a group with a rule, and an endpoint, whose ids the fuzz
    // uses half of the time (the rest are random, hence unknown) so that it gets past the 404s.
    let uni = host.api.create_universe("fuzz", "10.77.0.0/24");
    let uni = uni["id"].as_str().unwrap();
    let web = host.api.create_group(uni, "web");
    let web = web["id"].as_str().unwrap();
    host.api.add_rule(
        web,
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 80, "to_port": 80, "cidr": "10.0.0.0/8"}),
    );
    let default = host.api.default_group(uni);
    let default = default["id"].as_str().unwrap();
    let w = host.endpoint(uni, "10.77.0.10", &[]);

    let report = TempDir::new("z");
    let config = report.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            "[dictionaries.universes]\nvalues = [\"{uni}\"]\n\
             [dictionaries.groups]\nvalues = [\"{web}\", \"{default}\"]\n\
             [dictionaries.ids]\nvalues = [\"{uni}\", \"{web}\", \"{default}\", \"{}\"]\n\
             [dictionaries.endpoints]\nvalues = [\"{}\", \"10.77.0.10\", \"10.77.0.11\"]\n\
             [parameters]\n\
             \"query.universe\" = {{ dictionary = \"universes\", probability = 0.5 }}\n\
             \"query.from\" = {{ dictionary = \"endpoints\", probability = 0.5 }}\n\
             \"query.to\" = {{ dictionary = \"endpoints\", probability = 0.5 }}\n\
             \"body.universe\" = {{ dictionary = \"universes\", probability = 0.5 }}\n\
             \"body.group\" = {{ dictionary = \"groups\", probability = 0.5 }}\n\
             \"body.security_groups[*]\" = {{ dictionary = \"groups\", probability = 0.5 }}\n\
             \"path.id\" = {{ dictionary = \"ids\", probability = 0.5 }}\n",
            w.id, w.id
        ),
    )
    .unwrap();
    let hooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let admin = std::fs::read_to_string(host.state_dir().join("admin.token"))
        .expect("versed wrote the first admin token into its state directory");
    let authorization = format!("Authorization: Bearer {}", admin.trim());
    // tok-<the 8 hex of vt_<8 hex>_<secret>>: the hooks keep the fuzz from revoking it.
    let token_id = format!("tok-{}", admin.trim().split('_').nth(1).expect("vt_<id>_<secret>"));
    let schema = format!("{}/v1/openapi.json", host.api.url());
    let examples = std::env::var("VERSE_FUZZ_EXAMPLES").unwrap_or_else(|_| MAX_EXAMPLES.into());
    let seed = std::env::var("VERSE_FUZZ_SEED").unwrap_or_else(|_| SEED.into());
    let start = std::time::Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", host.netns().name()])
        .arg(&bin)
        .arg("--config-file")
        .arg(&config)
        .args(["run", &schema, "--checks", "all", "--max-examples", &examples])
        .args(["-H", &authorization])
        .args(["--phases", "examples,coverage,fuzzing", "--workers", "2", "--seed", &seed])
        .args(["--generation-database", "none", "--no-color", "--request-timeout", "30"])
        .arg("--report-dir")
        .arg(report.path())
        // Its caches and reports go to the temporary directory, not the source tree.
        .current_dir(report.path())
        .env("SCHEMATHESIS_HOOKS", "verse_hooks")
        .env("PYTHONPATH", &hooks)
        .env("VERSE_FUZZ_TOKEN_ID", &token_id)
        .env("VERSE_FUZZ_HOST", host.name())
        .output()
        .expect("run schemathesis");
    let took = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("schemathesis ran {took:?}:\n{stdout}");
    assert!(
        out.status.success(),
        "schemathesis found requests where the API and its document disagree ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // The daemon is still up and serving, and the fuzz got past the 404s to the handlers.
    assert_eq!(host.api.get("/healthz").status, 200);
    let r = host.api.get("/v1/tokens");
    assert_eq!(r.status, 200, "the fuzz's token still works: {}", r.body);
    let count = |path: &str| host.api.get(path).json().as_array().map_or(0, Vec::len);
    let revision = host.api.hosts()[0]["revision"].as_u64().unwrap_or(0);
    eprintln!(
        "after the fuzz: revision {revision}, {} universes, {} security groups",
        count("/v1/universes"),
        count("/v1/security-groups")
    );
    assert!(revision > 10, "the fuzz made edits (revision {revision})");
}
