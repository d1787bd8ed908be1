//! The command tree's parsing (realistic command lines and refused ones, per subcommand
//! group) and the shapes of what `--json` prints, built from values made here: no broker,
//! database or model runs.

use std::path::PathBuf;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{CommandFactory as _, Parser as _};
use serde_json::{Value, json};

use super::*;

/// `vigil ARGS...` parsed; panics with clap's message when it is refused.
fn parse(args: &[&str]) -> Command {
    match Cli::try_parse_from(std::iter::once("vigil").chain(args.iter().copied())) {
        Ok(cli) => cli.command,
        Err(e) => panic!("`vigil {}` refused: {e}", args.join(" ")),
    }
}

/// How clap refuses `vigil ARGS...`; panics when it is accepted.
fn refused(args: &[&str]) -> ErrorKind {
    match Cli::try_parse_from(std::iter::once("vigil").chain(args.iter().copied())) {
        Ok(cli) => panic!("`vigil {}` accepted: {:?}", args.join(" "), cli.command),
        Err(e) => e.kind(),
    }
}

/// The keys of a JSON object, sorted.
fn keys(v: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

// ---- The tree as a whole ----

#[test]
fn the_command_tree_passes_clap_s_own_checks() {
    Cli::command().debug_assert();
}

#[test]
fn the_config_file_is_a_global_option() {
    let cli =
        Cli::try_parse_from(["vigil", "topology", "print", "--config", "vigil.toml"]).unwrap();
    assert_eq!(cli.config, Some(PathBuf::from("vigil.toml")));
    assert!(matches!(
        cli.command,
        Command::Topology {
            action: TopologyCmd::Print
        }
    ));
}

#[test]
fn an_unknown_subcommand_is_refused() {
    assert_eq!(refused(&["frobnicate"]), ErrorKind::InvalidSubcommand);
    assert_eq!(
        refused(&["clients", "frobnicate"]),
        ErrorKind::InvalidSubcommand
    );
}

// ---- Shared value parsers ----

#[test]
fn ages_take_seconds_minutes_hours_and_days() {
    assert_eq!(parse_age("90s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_age("15"), Ok(Duration::from_secs(15)));
    assert_eq!(parse_age("10m"), Ok(Duration::from_secs(600)));
    assert_eq!(parse_age("2h"), Ok(Duration::from_secs(7200)));
    assert_eq!(parse_age("7d"), Ok(Duration::from_secs(7 * 86_400)));
    assert!(parse_age("10y").unwrap_err().contains("unknown unit"));
    assert!(parse_age("m").unwrap_err().contains("not a duration"));
    assert!(parse_age("").is_err());
}

#[test]
fn owners_are_uid_colon_gid() {
    assert_eq!(parse_owner("99:98"), Ok((99, 98)));
    assert_eq!(parse_owner("99"), Err("expected UID:GID".into()));
    assert!(parse_owner("x:1").unwrap_err().starts_with("uid"));
    assert!(parse_owner("1:-1").unwrap_err().starts_with("gid"));
}

// ---- config ----

#[test]
fn config_vars_parses_its_json_flag() {
    let Command::Config {
        action: ConfigCmd::Vars { json },
    } = parse(&["config", "vars", "--json"])
    else {
        panic!("not config vars")
    };
    assert!(json);
    let Command::Config {
        action: ConfigCmd::Vars { json },
    } = parse(&["config", "vars"])
    else {
        panic!("not config vars")
    };
    assert!(!json);
    assert_eq!(
        refused(&["config", "vars", "--json=yes"]),
        ErrorKind::TooManyValues
    );
}

#[test]
fn config_vars_json_lists_each_variable_without_its_setter() {
    let v = serde_json::to_value(crate::config::vars::VARS).unwrap();
    let vars = v.as_array().unwrap();
    assert!(!vars.is_empty());
    for var in vars {
        assert_eq!(keys(var), ["default", "meaning", "name", "roles"]);
        assert!(var["name"].as_str().unwrap().starts_with("VIGIL_"));
        assert!(var["default"].is_string());
        assert!(var["meaning"].is_string());
        for role in var["roles"].as_array().unwrap() {
            assert!(
                ["edge", "worker", "audit"].contains(&role.as_str().unwrap()),
                "{role}"
            );
        }
    }
}

// ---- topology ----

#[test]
fn topology_parses_and_delete_takes_yes() {
    assert!(matches!(
        parse(&["topology", "apply"]),
        Command::Topology {
            action: TopologyCmd::Apply
        }
    ));
    assert!(matches!(
        parse(&["topology", "delete", "--yes"]),
        Command::Topology {
            action: TopologyCmd::Delete { yes: true }
        }
    ));
    assert!(matches!(
        parse(&["topology", "delete"]),
        Command::Topology {
            action: TopologyCmd::Delete { yes: false }
        }
    ));
    assert_eq!(
        refused(&["topology", "apply", "--yes"]),
        ErrorKind::UnknownArgument
    );
}

// ---- operators ----

#[test]
fn operators_add_takes_a_name_and_a_role() {
    let Command::Operators {
        action: OperatorsCmd::Add { name, role },
    } = parse(&["operators", "add", "alice", "--role", "viewer"])
    else {
        panic!("not operators add")
    };
    assert_eq!(name, "alice");
    assert_eq!(role, crate::operators::Role::Viewer);
    let Command::Operators {
        action: OperatorsCmd::Add { role, .. },
    } = parse(&["operators", "add", "bob"])
    else {
        panic!("not operators add")
    };
    assert_eq!(role, crate::operators::Role::Proctor);
    assert_eq!(
        refused(&["operators", "add", "carol", "--role", "root"]),
        ErrorKind::InvalidValue
    );
    assert_eq!(
        refused(&["operators", "add"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        refused(&["operators", "remove"]),
        ErrorKind::MissingRequiredArgument
    );
    assert!(matches!(
        parse(&["operators", "list", "--json"]),
        Command::Operators {
            action: OperatorsCmd::List { json: true }
        }
    ));
}

#[test]
fn operators_list_json_shows_no_token_hash() {
    let entries = [crate::operators::OperatorEntry {
        name: "alice".into(),
        role: crate::operators::Role::Proctor,
        sha256: "ab".repeat(32),
        created_at_ms: 1_700_000_000_000,
    }];
    let v = operators::public_entries(&entries);
    assert_eq!(v.len(), 1);
    assert_eq!(keys(&v[0]), ["created_at_ms", "name", "role"]);
    assert_eq!(v[0]["name"], "alice");
    assert_eq!(v[0]["role"], "proctor");
    assert_eq!(v[0]["created_at_ms"].as_u64(), Some(1_700_000_000_000));
    assert!(!v[0].to_string().contains(&"ab".repeat(32)));
}

// ---- webhooks ----

#[test]
fn webhooks_parse_with_defaults_and_conflicts() {
    let Command::Webhooks {
        action: WebhooksCmd::List { limit, json },
    } = parse(&["webhooks", "list", "--limit", "5", "--json"])
    else {
        panic!("not webhooks list")
    };
    assert_eq!((limit, json), (5, true));
    let Command::Webhooks {
        action: WebhooksCmd::Retry { id, all, limit },
    } = parse(&["webhooks", "retry", "--id", "entry-1"])
    else {
        panic!("not webhooks retry")
    };
    assert_eq!(id.as_deref(), Some("entry-1"));
    assert!(!all);
    assert_eq!(limit, 10_000);
    assert_eq!(
        refused(&["webhooks", "retry", "--id", "entry-1", "--all"]),
        ErrorKind::ArgumentConflict
    );
    assert_eq!(
        refused(&["webhooks", "list", "--limit", "ten"]),
        ErrorKind::ValueValidation
    );
    assert!(matches!(
        parse(&["webhooks", "secret"]),
        Command::Webhooks {
            action: WebhooksCmd::Secret
        }
    ));
}

#[test]
fn webhooks_list_json_redacts_the_endpoint_and_leaves_out_the_body() {
    let job = crate::webhooks::Job {
        id: "entry-1".into(),
        endpoint: "https://user:s3cret@exam.example/hook?token=t0ken".into(),
        body: "{\"secret\":\"body\"}".into(),
        attempts: 6,
        created_at_ms: 1_000,
        last_error: Some("503 Service Unavailable".into()),
        last_try_at_ms: Some(2_000),
    };
    let v = webhooks::job_line(&job);
    assert_eq!(
        keys(&v),
        [
            "attempts",
            "created_at_ms",
            "endpoint",
            "id",
            "last_error",
            "last_try_at_ms"
        ]
    );
    assert_eq!(v["id"], "entry-1");
    assert_eq!(v["attempts"].as_u64(), Some(6));
    assert_eq!(v["created_at_ms"].as_u64(), Some(1_000));
    assert_eq!(v["last_error"], "503 Service Unavailable");
    assert_eq!(v["last_try_at_ms"].as_u64(), Some(2_000));
    let endpoint = v["endpoint"].as_str().unwrap();
    assert!(endpoint.contains("exam.example/hook"), "{endpoint}");
    assert!(
        !endpoint.contains("s3cret") && !endpoint.contains("t0ken"),
        "{endpoint}"
    );
    // Not yet tried: the keys stay, as nulls.
    let fresh = crate::webhooks::Job {
        last_error: None,
        last_try_at_ms: None,
        ..job
    };
    let v = webhooks::job_line(&fresh);
    assert!(v["last_error"].is_null() && v["last_try_at_ms"].is_null());
}

// ---- certs ----

#[test]
fn certs_dev_parses_hosts_days_and_owner() {
    let Command::Certs {
        action:
            CertsCmd::Dev {
                out,
                hosts,
                days,
                force,
                if_missing,
                owner,
            },
    } = parse(&[
        "certs",
        "dev",
        "--out",
        "certs",
        "--host",
        "exam.example",
        "--host",
        "10.0.0.5",
        "--days",
        "30",
        "--owner",
        "99:99",
    ])
    else {
        panic!("not certs dev")
    };
    assert_eq!(out, PathBuf::from("certs"));
    assert_eq!(hosts, ["exam.example", "10.0.0.5"]);
    assert_eq!(days, 30);
    assert!(!force && !if_missing);
    assert_eq!(owner, Some((99, 99)));
    let Command::Certs {
        action: CertsCmd::Dev { hosts, days, .. },
    } = parse(&["certs", "dev", "--out", "certs"])
    else {
        panic!("not certs dev")
    };
    assert!(hosts.is_empty());
    assert_eq!(days, 90);
}

#[test]
fn certs_dev_refuses_bad_lines() {
    assert_eq!(
        refused(&["certs", "dev", "--out", "c", "--force", "--if-missing"]),
        ErrorKind::ArgumentConflict
    );
    assert_eq!(
        refused(&["certs", "dev", "--out", "c", "--owner", "99"]),
        ErrorKind::ValueValidation
    );
    assert_eq!(
        refused(&["certs", "dev", "--out", "c", "--days", "5000000000"]),
        ErrorKind::ValueValidation
    );
    assert_eq!(
        refused(&["certs", "dev"]),
        ErrorKind::MissingRequiredArgument
    );
}

// ---- sessions ----

#[test]
fn sessions_parse() {
    let Command::Sessions {
        action: SessionsCmd::Mint { client, ttl },
    } = parse(&["sessions", "mint", "candidate-7", "--ttl", "600"])
    else {
        panic!("not sessions mint")
    };
    assert_eq!((client.as_str(), ttl), ("candidate-7", 600));
    let Command::Sessions {
        action: SessionsCmd::Mint { ttl, .. },
    } = parse(&["sessions", "mint", "candidate-7"])
    else {
        panic!("not sessions mint")
    };
    assert_eq!(ttl, 3600);
    let Command::Sessions {
        action: SessionsCmd::Keygen { out },
    } = parse(&["sessions", "keygen", "--out", "session.key"])
    else {
        panic!("not sessions keygen")
    };
    assert_eq!(out, PathBuf::from("session.key"));
    assert_eq!(
        refused(&["sessions", "mint", "c", "--ttl", "1h"]),
        ErrorKind::ValueValidation
    );
    assert_eq!(
        refused(&["sessions", "keygen"]),
        ErrorKind::MissingRequiredArgument
    );
}

// ---- broker ----

#[test]
fn broker_provision_parses_edges_via_and_out() {
    let Command::Broker {
        action:
            BrokerCmd::Provision {
                edges,
                via,
                rabbitmqctl,
                node,
                out,
                if_missing,
                owner,
                json,
            },
    } = parse(&[
        "broker",
        "provision",
        "--edge",
        "edge-a",
        "--edge",
        "edge-b",
        "--via",
        "management",
        "--out",
        "secrets",
        "--if-missing",
        "--owner",
        "1000:1000",
        "--json",
    ])
    else {
        panic!("not broker provision")
    };
    assert_eq!(edges, ["edge-a", "edge-b"]);
    assert_eq!(via, ProvisionVia::Management);
    assert_eq!(rabbitmqctl, PathBuf::from("rabbitmqctl"));
    assert_eq!(node, None);
    assert_eq!(out, Some(PathBuf::from("secrets")));
    assert!(if_missing && json);
    assert_eq!(owner, Some((1000, 1000)));
    let Command::Broker {
        action: BrokerCmd::Provision { edges, via, .. },
    } = parse(&["broker", "provision"])
    else {
        panic!("not broker provision")
    };
    assert!(edges.is_empty());
    assert_eq!(via, ProvisionVia::Auto);
}

#[test]
fn broker_provision_refuses_bad_lines() {
    // --if-missing and --owner are about the files of --out.
    assert_eq!(
        refused(&["broker", "provision", "--if-missing"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        refused(&["broker", "provision", "--owner", "1:1"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        refused(&["broker", "provision", "--via", "ftp"]),
        ErrorKind::InvalidValue
    );
}

#[test]
fn broker_bootstrap_parses_with_its_defaults() {
    let Command::Broker {
        action:
            BrokerCmd::Bootstrap {
                out,
                hosts,
                amqp_port,
                management_port,
                user,
                postgres,
                if_missing,
                broker_owner,
                postgres_owner,
                owner,
                cookie_dirs,
            },
    } = parse(&[
        "broker",
        "bootstrap",
        "--out",
        "secrets",
        "--host",
        "rabbit-1",
        "--host",
        "rabbit-2",
        "--postgres",
        "postgres://vigil@postgres:5432/vigil",
        "--broker-owner",
        "999:999",
        "--cookie-dir",
        "/var/lib/rabbitmq-1",
    ])
    else {
        panic!("not broker bootstrap")
    };
    assert_eq!(out, PathBuf::from("secrets"));
    assert_eq!(hosts, ["rabbit-1", "rabbit-2"]);
    assert_eq!((amqp_port, management_port), (5672, 15672));
    assert_eq!(user, "vigil-bootstrap");
    assert_eq!(
        postgres.as_deref(),
        Some("postgres://vigil@postgres:5432/vigil")
    );
    assert!(!if_missing);
    assert_eq!(broker_owner, Some((999, 999)));
    assert_eq!((postgres_owner, owner), (None, None));
    assert_eq!(cookie_dirs, [PathBuf::from("/var/lib/rabbitmq-1")]);
    assert_eq!(
        refused(&["broker", "bootstrap", "--out", "secrets"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        refused(&[
            "broker",
            "bootstrap",
            "--out",
            "s",
            "--host",
            "h",
            "--amqp-port",
            "70000"
        ]),
        ErrorKind::ValueValidation
    );
}

#[test]
fn broker_provision_json_shows_each_user_and_no_password_once_written() {
    use crate::roles::{Grant, Role, TopicGrant};
    let user = crate::tools::provision::Provisioned {
        role: Role::Edge,
        edge: Some("edge-a".into()),
        user: "vigil-edge-edge-a".into(),
        password: "pa55word".into(),
        url: "amqp://vigil-edge-edge-a:pa55word@rabbit:5672/%2f".into(),
        url_file: None,
        created: true,
        permissions: Grant {
            configure: "^$".into(),
            write: "^vigil\\.frames$".into(),
            read: "^vigil\\.edge\\.edge-a$".into(),
        },
        topic_permissions: Some(TopicGrant {
            exchange: "vigil.replies".into(),
            write: "^$".into(),
            read: "^edge\\.edge-a\\.".into(),
        }),
    };
    let v = serde_json::to_value(&user).unwrap();
    assert_eq!(
        keys(&v),
        [
            "created",
            "edge",
            "password",
            "permissions",
            "role",
            "topic_permissions",
            "url",
            "user"
        ]
    );
    assert_eq!(v["role"], "edge");
    assert_eq!(v["created"], true);
    assert_eq!(keys(&v["permissions"]), ["configure", "read", "write"]);
    assert_eq!(keys(&v["topic_permissions"]), ["exchange", "read", "write"]);
    // With --out: the file is named, the password and the URL are not.
    let v =
        serde_json::to_value(user.redacted(PathBuf::from("secrets/vigil-edge-edge-a/amqp.url")))
            .unwrap();
    assert_eq!(v["url_file"], "secrets/vigil-edge-edge-a/amqp.url");
    assert!(v.get("password").is_none() && v.get("url").is_none());
    assert!(!v.to_string().contains("pa55word"));
}

// ---- clients ----

#[test]
fn clients_parse_ids_tokens_and_actions() {
    let Command::Clients {
        action: ClientsCmd::Add { id, token, name },
    } = parse(&[
        "clients",
        "add",
        "candidate-7",
        "--token",
        "tok-12345678",
        "--name",
        "Ada Lovelace",
    ])
    else {
        panic!("not clients add")
    };
    assert_eq!(id, "candidate-7");
    assert_eq!(token.as_deref(), Some("tok-12345678"));
    assert_eq!(name, "Ada Lovelace");
    let Command::Clients {
        action: ClientsCmd::Add { token, name, .. },
    } = parse(&["clients", "add", "candidate-8"])
    else {
        panic!("not clients add")
    };
    assert_eq!((token, name.as_str()), (None, ""));
    let Command::Clients {
        action: ClientsCmd::Action { id, action },
    } = parse(&["clients", "action", "candidate-7", "lock_screen"])
    else {
        panic!("not clients action")
    };
    assert_eq!(id, "candidate-7");
    assert_eq!(action, crate::policy::Action::LockScreen);
    let Command::Clients {
        action: ClientsCmd::Enroll { id, reference },
    } = parse(&[
        "clients",
        "enroll",
        "candidate-7",
        "--reference",
        "a.jpg",
        "--reference",
        "b.jpg",
    ])
    else {
        panic!("not clients enroll")
    };
    assert_eq!(id, "candidate-7");
    assert_eq!(reference, [PathBuf::from("a.jpg"), PathBuf::from("b.jpg")]);
    assert!(matches!(
        parse(&["clients", "readmit", "candidate-7"]),
        Command::Clients { action: ClientsCmd::Readmit { id } } if id == "candidate-7"
    ));
    assert!(matches!(
        parse(&["clients", "list", "--json"]),
        Command::Clients {
            action: ClientsCmd::List { json: true }
        }
    ));
}

#[test]
fn clients_refuse_bad_lines() {
    assert_eq!(
        refused(&["clients", "action", "candidate-7", "explode"]),
        ErrorKind::ValueValidation
    );
    assert_eq!(
        refused(&["clients", "enroll", "candidate-7"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        refused(&["clients", "pause"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        refused(&["clients", "block", "a", "b"]),
        ErrorKind::UnknownArgument
    );
}

#[test]
fn clients_list_json_shapes_each_client() {
    use crate::directory::{ClientStatus, Connection};
    let view = crate::admin::ClientView {
        id: "candidate-7".into(),
        display_name: "Ada Lovelace".into(),
        status: ClientStatus::SignedOut,
        connection: Connection::Active,
        edge: Some("edge-a".into()),
        connected_since_ms: Some(1_000),
        enrolled: true,
        created_at_ms: 10,
        updated_at_ms: 20,
        fps: 4.5,
        last_verdict: Some("ok".into()),
        last_action: None,
    };
    let v = serde_json::to_value(vec![view]).unwrap();
    let c = &v.as_array().unwrap()[0];
    assert_eq!(
        keys(c),
        [
            "connected_since_ms",
            "connection",
            "created_at_ms",
            "display_name",
            "edge",
            "enrolled",
            "fps",
            "id",
            "last_action",
            "last_verdict",
            "status",
            "updated_at_ms"
        ]
    );
    assert_eq!(c["status"], "signed_out");
    assert_eq!(c["connection"], "active");
    assert_eq!(c["enrolled"], true);
    assert_eq!(c["fps"].as_f64(), Some(4.5));
    assert_eq!(c["edge"], "edge-a");
    assert!(c["last_action"].is_null());
}

// ---- directory ----

#[test]
fn directory_parses_and_refuses() {
    let Command::Directory {
        action:
            DirectoryCmd::Import {
                from,
                replace,
                json,
            },
    } = parse(&[
        "directory",
        "import",
        "clients.jsonl",
        "--replace",
        "--json",
    ])
    else {
        panic!("not directory import")
    };
    assert_eq!(from, PathBuf::from("clients.jsonl"));
    assert!(replace && json);
    let Command::Directory {
        action: DirectoryCmd::Export { out },
    } = parse(&["directory", "export", "--out", "clients.jsonl"])
    else {
        panic!("not directory export")
    };
    assert_eq!(out, Some(PathBuf::from("clients.jsonl")));
    assert!(matches!(
        parse(&["directory", "migrate"]),
        Command::Directory {
            action: DirectoryCmd::Migrate
        }
    ));
    assert_eq!(
        refused(&["directory", "import"]),
        ErrorKind::MissingRequiredArgument
    );
}

#[test]
fn directory_import_json_counts_what_it_did() {
    let done = crate::directory::Imported {
        added: 2,
        replaced: 1,
        kept: 3,
    };
    let v = serde_json::to_value(done).unwrap();
    assert_eq!(v, json!({"added": 2, "replaced": 1, "kept": 3}));
}

// ---- stream ----

#[test]
fn stream_parses_with_its_defaults() {
    let Command::Stream(args) = parse(&[
        "stream",
        "--url",
        "ws://127.0.0.1:8080/v1/stream",
        "--client-id",
        "candidate-7",
        "--token",
        "tok-12345678",
        "--images",
        "frames/",
        "--images",
        "more.jpg",
        "--msgpack",
    ]) else {
        panic!("not stream")
    };
    assert_eq!(args.url, "ws://127.0.0.1:8080/v1/stream");
    assert_eq!(args.client_id, "candidate-7");
    assert_eq!(args.token, "tok-12345678");
    assert_eq!(
        args.images,
        [PathBuf::from("frames/"), PathBuf::from("more.jpg")]
    );
    assert_eq!(args.fps, 5.0);
    assert_eq!(args.frames, 20);
    assert!(args.msgpack);
    assert_eq!((args.answer_from, args.reference), (None, None));
    let Command::Stream(args) = parse(&[
        "stream",
        "--url",
        "ws://e",
        "--client-id",
        "c",
        "--token",
        "t",
        "--images",
        "f",
        "--fps",
        "2.5",
        "--frames",
        "7",
        "--answer-from",
        "footage",
        "--reference",
        "ref.jpg",
    ]) else {
        panic!("not stream")
    };
    assert_eq!((args.fps, args.frames), (2.5, 7));
    assert_eq!(args.answer_from, Some(PathBuf::from("footage")));
    assert_eq!(args.reference, Some(PathBuf::from("ref.jpg")));
}

#[test]
fn stream_refuses_bad_lines() {
    let base = [
        "stream",
        "--url",
        "ws://e",
        "--client-id",
        "c",
        "--token",
        "t",
    ];
    assert_eq!(refused(&base), ErrorKind::MissingRequiredArgument);
    let with = |extra: &[&'static str]| [&base[..], &["--images", "f"][..], extra].concat();
    assert_eq!(
        refused(&with(&["--answer-from", "footage"])),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        refused(&with(&["--fps", "fast"])),
        ErrorKind::ValueValidation
    );
    assert_eq!(
        refused(&with(&["--frames", "2.5"])),
        ErrorKind::ValueValidation
    );
}

// ---- models, analyze ----

#[test]
fn models_and_analyze_parse() {
    let Command::Models {
        action: ModelsCmd::Fetch { cache, python },
    } = parse(&[
        "models",
        "fetch",
        "--cache",
        "/srv/models",
        "--python",
        "python3.12",
    ])
    else {
        panic!("not models fetch")
    };
    assert_eq!(cache, Some(PathBuf::from("/srv/models")));
    assert_eq!(python, Some(PathBuf::from("python3.12")));
    assert!(matches!(
        parse(&["models", "check"]),
        Command::Models {
            action: ModelsCmd::Check
        }
    ));
    let Command::Analyze { images, reference } =
        parse(&["analyze", "a.jpg", "b.jpg", "--reference", "ref.jpg"])
    else {
        panic!("not analyze")
    };
    assert_eq!(images, [PathBuf::from("a.jpg"), PathBuf::from("b.jpg")]);
    assert_eq!(reference, Some(PathBuf::from("ref.jpg")));
    assert_eq!(refused(&["analyze"]), ErrorKind::MissingRequiredArgument);
}

#[test]
fn analyze_prints_a_line_per_photo_without_the_face_s_appearance() {
    let mut analysis = crate::wire::IdentityAnalysis {
        verdict: crate::wire::Verdict::Ok,
        faces: vec![crate::wire::FaceBox {
            x: 10.0,
            y: 20.0,
            w: 100.0,
            h: 120.0,
            score: 0.9,
        }],
        identity: Some(crate::wire::IdentityScore {
            similarity: 0.7,
            matched: true,
        }),
        liveness: None,
        phone: None,
        models: vec!["scrfd:10g".into()],
        skipped: vec![],
        carried: vec![],
        thresholds: Default::default(),
        quality: None,
        appearance: Some(serde_bytes::ByteBuf::from(vec![1u8; 64])),
        track: None,
    };
    let stages = [("detect", 0.012), ("embed", 0.0305)];
    let v = models::analysis_line(std::path::Path::new("photos/a.jpg"), &mut analysis, &stages);
    assert_eq!(keys(&v), ["analysis", "file", "stages_ms"]);
    assert_eq!(v["file"], "photos/a.jpg");
    assert_eq!(v["analysis"]["verdict"], "ok");
    assert!(v["analysis"]["faces"].is_array());
    assert!(v["analysis"].get("appearance").is_none());
    assert_eq!(keys(&v["stages_ms"]), ["detect", "embed"]);
    assert!((v["stages_ms"]["detect"].as_f64().unwrap() - 12.0).abs() < 1e-9);
    assert!((v["stages_ms"]["embed"].as_f64().unwrap() - 30.5).abs() < 1e-9);
    let v = models::error_line(std::path::Path::new("photos/b.jpg"), &"no face found");
    assert_eq!(v, json!({"file": "photos/b.jpg", "error": "no face found"}));
}

// ---- eval ----

#[test]
fn eval_parses_with_its_defaults() {
    let Command::Eval {
        data,
        out,
        fps,
        attack_frames,
        footage,
        fetch_only,
    } = parse(&["eval"])
    else {
        panic!("not eval")
    };
    assert_eq!(data, PathBuf::from(".cache/eval"));
    assert_eq!(out, PathBuf::from("target/eval"));
    assert_eq!(fps, 5.0);
    assert_eq!(attack_frames, 150);
    assert_eq!(footage, PathBuf::from(".cache/footage"));
    assert!(!fetch_only);
    let Command::Eval {
        fps, fetch_only, ..
    } = parse(&["eval", "--fps", "10", "--fetch-only"])
    else {
        panic!("not eval")
    };
    assert_eq!(fps, 10.0);
    assert!(fetch_only);
    assert_eq!(
        refused(&["eval", "--attack-frames", "many"]),
        ErrorKind::ValueValidation
    );
}

// ---- bench ----

#[test]
fn bench_parses_each_benchmark() {
    let Command::Bench {
        which:
            BenchCmd::Models {
                images,
                frames,
                python,
                json,
            },
    } = parse(&["bench", "models", "--images", "photos"])
    else {
        panic!("not bench models")
    };
    assert_eq!(images, PathBuf::from("photos"));
    assert_eq!(frames, 60);
    assert_eq!(python, None);
    assert!(!json);
    let Command::Bench {
        which:
            BenchCmd::Cost {
                clients,
                fps,
                clips,
                seconds,
                warmup_seconds,
                rounds,
                workers,
                json,
            },
    } = parse(&[
        "bench",
        "cost",
        "--clip",
        "a",
        "--clip",
        "b",
        "--workers",
        "3",
        "--json",
    ])
    else {
        panic!("not bench cost")
    };
    assert_eq!((clients, fps), (4, 5.0));
    assert_eq!(clips, [PathBuf::from("a"), PathBuf::from("b")]);
    assert_eq!((seconds, warmup_seconds, rounds), (30, 8, 2));
    assert_eq!(workers, Some(3));
    assert!(json);
    let Command::Bench {
        which:
            BenchCmd::Transport {
                clients,
                fps,
                frame_bytes,
                inflight,
                only,
                namespace,
                ..
            },
    } = parse(&[
        "bench",
        "transport",
        "--only",
        "bare-routed",
        "--namespace",
        "bench1",
        "--fps",
        "30",
    ])
    else {
        panic!("not bench transport")
    };
    assert_eq!((clients, fps, frame_bytes, inflight), (4, 30, 40_000, 2));
    assert_eq!(only, Some(crate::tools::bench::Side::BareRouted));
    assert_eq!(namespace.as_deref(), Some("bench1"));
}

#[test]
fn bench_refuses_bad_lines() {
    assert_eq!(
        refused(&["bench", "models"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        refused(&["bench", "transport", "--only", "everything"]),
        ErrorKind::InvalidValue
    );
    assert_eq!(
        refused(&["bench", "transport", "--fps", "2.5"]),
        ErrorKind::ValueValidation
    );
}

#[test]
fn bench_models_json_shape() {
    let report = crate::tools::bench::ModelsReport {
        frames: 60,
        intra_threads: 1,
        rust_ms: [("detect".to_owned(), 8.0), ("embed".to_owned(), 12.5)].into(),
        rust_frame_ms: 21.0,
        rust_frames_per_s: 47.6,
        python_ms: None,
        python_sum_ms: None,
        ratio: None,
    };
    let v = serde_json::to_value(&report).unwrap();
    assert_eq!(
        keys(&v),
        [
            "frames",
            "intra_threads",
            "python_ms",
            "python_sum_ms",
            "ratio",
            "rust_frame_ms",
            "rust_frames_per_s",
            "rust_ms"
        ]
    );
    assert_eq!(v["frames"].as_u64(), Some(60));
    assert_eq!(v["rust_ms"]["embed"].as_f64(), Some(12.5));
    assert!(v["python_ms"].is_null() && v["ratio"].is_null());
}

#[test]
fn bench_transport_json_shape() {
    let figures = crate::tools::bench::Figures {
        frames: 1000,
        seconds: 5.0,
        frames_per_s: 200.0,
        p50_ms: 3.0,
        p99_ms: 9.0,
        dropped: 0,
        own_cpu_us_per_frame: 150.0,
        broker_cpu_us_per_frame: None,
    };
    let report = crate::tools::bench::TransportReport {
        clients: 4,
        inflight_total: 8,
        frame_bytes: 40_000,
        vigil: figures.clone(),
        bare: figures.clone(),
        bare_routed: figures,
        rounds: vec![crate::tools::bench::Round {
            vigil: 190.0,
            bare: 200.0,
            bare_routed: 195.0,
        }],
        throughput_ratio: 0.95,
        routed_ratio: 0.97,
        p50_delta_ms: 0.4,
    };
    let v = serde_json::to_value(&report).unwrap();
    assert_eq!(
        keys(&v),
        [
            "bare",
            "bare_routed",
            "clients",
            "frame_bytes",
            "inflight_total",
            "p50_delta_ms",
            "rounds",
            "routed_ratio",
            "throughput_ratio",
            "vigil"
        ]
    );
    assert_eq!(
        keys(&v["vigil"]),
        [
            "broker_cpu_us_per_frame",
            "dropped",
            "frames",
            "frames_per_s",
            "own_cpu_us_per_frame",
            "p50_ms",
            "p99_ms",
            "seconds"
        ]
    );
    assert_eq!(keys(&v["rounds"][0]), ["bare", "bare_routed", "vigil"]);
    assert_eq!(v["throughput_ratio"].as_f64(), Some(0.95));
}

#[test]
fn bench_cost_json_shape() {
    let side = crate::tools::cost::SideReport {
        side: crate::tools::cost::Side::Cadence,
        phone_every: 4,
        recheck_ms: 2000,
        frames: 600,
        dropped: 1,
        seconds: 30.0,
        cpu_ms_per_frame: 40.0,
        cpu_s_per_candidate_hour: 720.0,
        candidates_per_core: 5.0,
        inference_ms_per_frame: 35.0,
        stages_ms_per_frame: [("detect".to_owned(), 9.0)].into(),
        p50_ms: 80.0,
        p99_ms: 200.0,
        swap_caught_s: vec![Some(1.4), None],
        ended_early: 0,
        batch_max: 4,
        frames_per_batch: Some(1.8),
    };
    let report = crate::tools::cost::CostReport {
        clients: 4,
        fps: 5.0,
        workers: 2,
        clips: vec!["talkingface".into()],
        rounds: 2,
        sides: vec![side],
        cpu_ratio: 0.6,
    };
    let v = serde_json::to_value(&report).unwrap();
    assert_eq!(
        keys(&v),
        [
            "clients",
            "clips",
            "cpu_ratio",
            "fps",
            "rounds",
            "sides",
            "workers"
        ]
    );
    let s = &v["sides"][0];
    assert_eq!(s["side"], "cadence");
    assert_eq!(s["swap_caught_s"], json!([1.4, null]));
    assert_eq!(s["stages_ms_per_frame"]["detect"].as_f64(), Some(9.0));
    assert_eq!(s["frames_per_batch"].as_f64(), Some(1.8));
    assert!(s["candidates_per_core"].is_f64());
}

// ---- record, capture, replay ----

#[test]
fn record_parses_live_and_from_the_stream() {
    let Command::Record {
        out,
        from_stream,
        since,
        results,
        duration,
        frames,
    } = parse(&[
        "record",
        "--out",
        "exam.capture",
        "--results",
        "--duration",
        "10m",
        "--frames",
        "500",
    ])
    else {
        panic!("not record")
    };
    assert_eq!(out, PathBuf::from("exam.capture"));
    assert!(!from_stream && results);
    assert_eq!(since, None);
    assert_eq!(duration, Some(Duration::from_secs(600)));
    assert_eq!(frames, Some(500));
    let Command::Record {
        from_stream, since, ..
    } = parse(&["record", "--out", "o", "--from-stream", "--since", "2h"])
    else {
        panic!("not record")
    };
    assert!(from_stream);
    assert_eq!(since, Some(Duration::from_secs(7200)));
    assert_eq!(
        refused(&["record", "--out", "o", "--from-stream"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        refused(&["record", "--out", "o", "--duration", "10y"]),
        ErrorKind::ValueValidation
    );
    assert_eq!(refused(&["record"]), ErrorKind::MissingRequiredArgument);
    let Command::Capture {
        action: CaptureCmd::Info { file },
    } = parse(&["capture", "info", "exam.capture"])
    else {
        panic!("not capture info")
    };
    assert_eq!(file, PathBuf::from("exam.capture"));
}

#[test]
fn replay_parses_a_file_or_the_stream() {
    use crate::tools::replay::Speed;
    let Command::Replay {
        file,
        from_stream,
        since,
        speed,
        compare,
        tolerance,
        inflight,
        json,
        out,
    } = parse(&[
        "replay",
        "exam.capture",
        "--speed",
        "4",
        "--compare",
        "--tolerance",
        "0.05",
        "--json",
        "--out",
        "report.json",
    ])
    else {
        panic!("not replay")
    };
    assert_eq!(file, Some(PathBuf::from("exam.capture")));
    assert!(!from_stream);
    assert_eq!(since, None);
    assert_eq!(speed, Speed::Factor(4.0));
    assert!(compare && json);
    assert_eq!(tolerance, 0.05);
    assert_eq!(inflight, 32);
    assert_eq!(out, Some(PathBuf::from("report.json")));
    let Command::Replay {
        file,
        from_stream,
        since,
        speed,
        tolerance,
        ..
    } = parse(&[
        "replay",
        "--from-stream",
        "--since",
        "10m",
        "--speed",
        "max",
    ])
    else {
        panic!("not replay")
    };
    assert_eq!(file, None);
    assert!(from_stream);
    assert_eq!(since, Some(Duration::from_secs(600)));
    assert_eq!(speed, Speed::Max);
    assert_eq!(tolerance, 0.0);
    assert_eq!(refused(&["replay"]), ErrorKind::MissingRequiredArgument);
    assert_eq!(
        refused(&["replay", "--from-stream"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        refused(&["replay", "f", "--speed", "0"]),
        ErrorKind::ValueValidation
    );
}

#[test]
fn replay_json_shape() {
    use crate::tools::replay::{ClientReport, Comparison, FrameDiff, ReplayReport};
    let report = ReplayReport {
        replay_edge: "replay-1".into(),
        frames: 10,
        results: 9,
        dropped: [("expired".to_owned(), 1)].into(),
        unanswered: 0,
        latency_ms: [("p50".to_owned(), 40.0)].into(),
        seconds: 2.0,
        clients: [(
            "candidate-7".to_owned(),
            ClientReport {
                frames: 10,
                outcomes: [("ok".to_owned(), 9)].into(),
                actions: vec!["warn (no_face) at seq 4".into()],
            },
        )]
        .into(),
        comparison: Some(Comparison {
            frames_compared: 9,
            frame_differences: vec![FrameDiff {
                client: "candidate-7".into(),
                seq: 4,
                recorded: "ok".into(),
                replayed: "no_face".into(),
            }],
            action_differences: [(
                "candidate-7".to_owned(),
                (vec![], vec!["warn (no_face) at seq 4".to_owned()]),
            )]
            .into(),
            difference_rate: 0.11,
            tolerance: 0.0,
            exceeded: true,
        }),
    };
    let v = serde_json::to_value(&report).unwrap();
    assert_eq!(
        keys(&v),
        [
            "clients",
            "comparison",
            "dropped",
            "frames",
            "latency_ms",
            "replay_edge",
            "results",
            "seconds",
            "unanswered"
        ]
    );
    assert_eq!(
        keys(&v["clients"]["candidate-7"]),
        ["actions", "frames", "outcomes"]
    );
    let c = &v["comparison"];
    assert_eq!(c["exceeded"], true);
    assert_eq!(
        keys(&c["frame_differences"][0]),
        ["client", "recorded", "replayed", "seq"]
    );
    // Each client's differing actions: [recorded, replayed].
    assert_eq!(
        c["action_differences"]["candidate-7"],
        json!([[], ["warn (no_face) at seq 4"]])
    );
}

// ---- loadgen, soak ----

#[test]
fn loadgen_and_soak_parse() {
    let Command::Loadgen(args) = parse(&[
        "loadgen",
        "--url",
        "ws://127.0.0.1:8080/v1/stream",
        "--clients",
        "50",
        "--duration",
        "2m",
        "--images",
        "frames",
        "--create-clients",
        "--json",
    ]) else {
        panic!("not loadgen")
    };
    assert_eq!(args.url, "ws://127.0.0.1:8080/v1/stream");
    assert_eq!(args.clients, 50);
    assert_eq!(args.fps, 5.0);
    assert_eq!(args.duration, Duration::from_secs(120));
    assert_eq!(args.images, Some(PathBuf::from("frames")));
    assert_eq!(args.capture, None);
    assert_eq!(args.client_prefix, "loadgen-");
    assert_eq!(args.token, "loadgen-token-000");
    assert!(args.create_clients && args.json);
    let Command::Soak { load, window, pid } = parse(&[
        "soak",
        "--url",
        "ws://e",
        "--duration",
        "10m",
        "--window",
        "30s",
        "--pid",
        "101",
        "--pid",
        "102",
    ]) else {
        panic!("not soak")
    };
    assert_eq!(load.duration, Duration::from_secs(600));
    assert_eq!(window, Duration::from_secs(30));
    assert_eq!(pid, [101, 102]);
    let Command::Soak { window, .. } = parse(&["soak", "--url", "ws://e"]) else {
        panic!("not soak")
    };
    assert_eq!(window, Duration::from_secs(60));
}

#[test]
fn loadgen_refuses_bad_lines() {
    assert_eq!(refused(&["loadgen"]), ErrorKind::MissingRequiredArgument);
    assert_eq!(
        refused(&[
            "loadgen",
            "--url",
            "ws://e",
            "--images",
            "d",
            "--capture",
            "c"
        ]),
        ErrorKind::ArgumentConflict
    );
    assert_eq!(
        refused(&["loadgen", "--url", "ws://e", "--clients", "many"]),
        ErrorKind::ValueValidation
    );
    assert_eq!(
        refused(&["soak", "--url", "ws://e", "--pid", "init"]),
        ErrorKind::ValueValidation
    );
}

fn load_report(clients: usize) -> crate::tools::loadgen::LoadReport {
    crate::tools::loadgen::LoadReport {
        clients,
        fps_per_client: 5.0,
        frames_sent: 500,
        results: 498,
        dropped: 2,
        dropped_by_reason: [("superseded".to_owned(), 2)].into(),
        errors: 0,
        errors_by_kind: Default::default(),
        connect_retries: 1,
        verdicts: [("ok".to_owned(), 498)].into(),
        actions: Default::default(),
        duration_s: 10.0,
        results_per_s: 49.8,
        p50_ms: 30.0,
        p90_ms: 45.0,
        p99_ms: 80.0,
        max_ms: 120.0,
    }
}

#[test]
fn loadgen_json_shape() {
    let v = serde_json::to_value(load_report(10)).unwrap();
    assert_eq!(
        keys(&v),
        [
            "actions",
            "clients",
            "connect_retries",
            "dropped",
            "dropped_by_reason",
            "duration_s",
            "errors",
            "errors_by_kind",
            "fps_per_client",
            "frames_sent",
            "max_ms",
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "results",
            "results_per_s",
            "verdicts"
        ]
    );
    assert_eq!(v["clients"].as_u64(), Some(10));
    assert_eq!(v["dropped_by_reason"]["superseded"].as_u64(), Some(2));
    assert_eq!(v["errors_by_kind"], json!({}));
    assert!(v["p99_ms"].is_f64());
}

// ---- attack ----

#[test]
fn attack_parses_with_its_defaults() {
    let Command::Attack(args) = parse(&[
        "attack",
        "--url",
        "ws://127.0.0.1:8080/v1/stream",
        "--token",
        "tok-12345678",
        "--sockets",
        "100",
        "--sources",
        "4",
        "--hold",
        "90s",
        "--edge-pid",
        "42",
        "--worker-pid",
        "43",
        "--worker-pid",
        "44",
        "--json",
    ]) else {
        panic!("not attack")
    };
    assert_eq!(args.url, "ws://127.0.0.1:8080/v1/stream");
    assert_eq!(args.token, "tok-12345678");
    assert_eq!((args.sockets, args.sources), (100, 4));
    assert_eq!(args.hold, Duration::from_secs(90));
    assert_eq!(args.edge_pid, [42]);
    assert_eq!(args.worker_pid, [43, 44]);
    assert!(args.json && !args.create_clients);
    assert_eq!(args.client_prefix, "attack-legit-");
    assert_eq!(args.hostile_prefix, "attack-hostile-");
    assert_eq!((args.legit_clients, args.legit_fps), (10, 0.5));
    assert_eq!(args.unloaded, Duration::from_secs(20));
    assert_eq!(args.jpeg_duration, Duration::from_secs(60));
    assert_eq!(args.jpeg_fps, 30.0);
    assert_eq!(
        (args.unauthenticated_close_s, args.authenticated_close_s),
        (8.0, 68.0)
    );
}

#[test]
fn attack_refuses_bad_lines() {
    assert_eq!(
        refused(&["attack", "--url", "ws://e"]),
        ErrorKind::MissingRequiredArgument
    );
    // Source addresses are 127.0.0.2 and on: at most 255 of them.
    assert_eq!(
        refused(&[
            "attack",
            "--url",
            "ws://e",
            "--token",
            "t",
            "--sources",
            "300"
        ]),
        ErrorKind::ValueValidation
    );
    assert_eq!(
        refused(&[
            "attack", "--url", "ws://e", "--token", "t", "--hold", "soon"
        ]),
        ErrorKind::ValueValidation
    );
}

#[test]
fn attack_json_shape() {
    use crate::tools::attack::{
        AttackReport, Budgets, Check, JpegReport, Memory, SocketKindReport, sockets::Kind,
    };
    let memory = Memory {
        pid: 42,
        before_mib: 50.0,
        max_mib: 80.0,
    };
    let report = AttackReport {
        unloaded: load_report(10),
        under_attack: load_report(10),
        sockets: vec![SocketKindReport {
            kind: Kind::AuthenticatedNonReader,
            sockets: 33,
            connect_failed: 0,
            refused_at_accept: 1,
            closed: 32,
            still_open: 0,
            p50_close_s: 61.0,
            max_close_s: 63.5,
        }],
        sources: 4,
        edges: vec![memory.clone()],
        jpegs: JpegReport {
            fps: 30.0,
            duration_s: 60.0,
            sent: 1800,
            answered: 1800,
            unanswered: 0,
            answers: [(
                "truncated".to_owned(),
                [("dropped bad_frame: truncated".to_owned(), 60)].into(),
            )]
            .into(),
            probe: [("truncated".to_owned(), "dropped bad_frame".to_owned())].into(),
            unexpected: vec![],
            workers: vec![memory],
            worker_restarts: 0,
        },
        budgets: Budgets {
            p99_factor: 2.0,
            edge_rss_mib: 256.0,
            worker_rss_rise_mib: 200.0,
            unauthenticated_close_s: 8.0,
            authenticated_close_s: 68.0,
        },
        checks: vec![Check {
            what: "p99 under attack".into(),
            pass: true,
            detail: "80 ms <= 2 x 80 ms".into(),
        }],
    };
    let v = serde_json::to_value(&report).unwrap();
    assert_eq!(
        keys(&v),
        [
            "budgets",
            "checks",
            "edges",
            "jpegs",
            "sockets",
            "sources",
            "under_attack",
            "unloaded"
        ]
    );
    assert_eq!(v["sockets"][0]["kind"], "authenticated_non_reader");
    assert_eq!(keys(&v["edges"][0]), ["before_mib", "max_mib", "pid"]);
    assert_eq!(keys(&v["checks"][0]), ["detail", "pass", "what"]);
    assert_eq!(v["checks"][0]["pass"], true);
    assert_eq!(
        v["jpegs"]["answers"]["truncated"]["dropped bad_frame: truncated"].as_u64(),
        Some(60)
    );
    assert_eq!(v["budgets"]["edge_rss_mib"].as_f64(), Some(256.0));
    assert_eq!(v["unloaded"]["frames_sent"].as_u64(), Some(500));
}

// ---- audit ----

#[test]
fn audit_parses_each_subcommand() {
    assert!(matches!(
        parse(&["audit", "serve"]),
        Command::Audit {
            action: AuditCmd::Serve
        }
    ));
    let Command::Audit {
        action: AuditCmd::Verify {
            public_key,
            offline,
        },
    } = parse(&[
        "audit",
        "verify",
        "--public-key",
        "audit.key.pub",
        "--offline",
    ])
    else {
        panic!("not audit verify")
    };
    assert_eq!(public_key, Some(PathBuf::from("audit.key.pub")));
    assert!(offline);
    let Command::Audit {
        action: AuditCmd::List {
            client,
            since,
            json,
        },
    } = parse(&[
        "audit",
        "list",
        "--client",
        "candidate-7",
        "--since",
        "2h",
        "--json",
    ])
    else {
        panic!("not audit list")
    };
    assert_eq!(client.as_deref(), Some("candidate-7"));
    assert_eq!(since, Some(Duration::from_secs(7200)));
    assert!(json);
    let Command::Audit {
        action: AuditCmd::Prune { older_than, json },
    } = parse(&["audit", "prune", "--older-than", "30d"])
    else {
        panic!("not audit prune")
    };
    assert_eq!(older_than, Duration::from_secs(30 * 86_400));
    assert!(!json);
    let Command::Audit {
        action: AuditCmd::Adopt { head },
    } = parse(&["audit", "adopt", "--head", "9f86d081"])
    else {
        panic!("not audit adopt")
    };
    assert_eq!(head, "9f86d081");
    assert!(matches!(
        parse(&["audit", "show", "0190a6f2-0000-7000-8000-000000000000"]),
        Command::Audit { action: AuditCmd::Show { action_id } }
            if action_id == "0190a6f2-0000-7000-8000-000000000000"
    ));
}

#[test]
fn audit_refuses_bad_lines() {
    assert_eq!(
        refused(&["audit", "prune"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        refused(&["audit", "prune", "--older-than", "a while"]),
        ErrorKind::ValueValidation
    );
    assert_eq!(
        refused(&["audit", "adopt"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        refused(&["audit", "keygen"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        refused(&["audit", "list", "--since", "7w"]),
        ErrorKind::ValueValidation
    );
}

#[test]
fn audit_list_json_shape() {
    let record = crate::audit::AuditRecord {
        action_id: uuid::Uuid::nil(),
        evidence_id: uuid::Uuid::from_u128(1),
        action: crate::policy::Action::SignOut,
        reason: "wrong_person".into(),
        origin: "policy".into(),
        client_id: "candidate-7".into(),
        edge: "edge-a".into(),
        session: "00000000000000ff".into(),
        rule: "wrong_person x3".into(),
        decided_at_ms: 1_700_000_000_000,
        written_at_ms: 1_700_000_000_050,
        frames: vec![],
        models: vec!["sface:2021dec".into()],
        thresholds: [("match".to_owned(), 0.41f32)].into(),
        evidence_files: vec!["2023-11-14/candidate-7/frame-1.jpg".into()],
        evidence_sha256: vec!["00".repeat(32)],
        operator: None,
        challenge: None,
        evidence_withheld: 0,
    };
    let v = serde_json::to_value(vec![record]).unwrap();
    let r = &v.as_array().unwrap()[0];
    assert_eq!(
        keys(r),
        [
            "action",
            "action_id",
            "client_id",
            "decided_at_ms",
            "edge",
            "evidence_files",
            "evidence_id",
            "evidence_sha256",
            "frames",
            "models",
            "origin",
            "reason",
            "rule",
            "session",
            "thresholds",
            "written_at_ms"
        ]
    );
    assert_eq!(r["action"], "sign_out");
    assert_eq!(r["action_id"], "00000000-0000-0000-0000-000000000000");
    assert_eq!(r["decided_at_ms"].as_u64(), Some(1_700_000_000_000));
    assert!(r["evidence_files"][0].is_string());
    assert!(r["thresholds"]["match"].is_f64());
}

#[test]
fn audit_prune_json_shape() {
    let report = crate::audit::PruneReport {
        before_ms: 1_700_000_000_000,
        actions: 3,
        files: 12,
        bytes: 480_000,
    };
    assert_eq!(
        serde_json::to_value(report).unwrap(),
        json!({"before_ms": 1_700_000_000_000u64, "actions": 3, "files": 12, "bytes": 480_000})
    );
}
