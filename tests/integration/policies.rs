//! Queue tunables as RabbitMQ policies (VIGIL_BROKER_MANAGEMENT_URL): on a private node with
//! the management plugin, the services put one policy per shared queue and declare the queues
//! without those arguments, so a changed TTL or length limit takes effect on the live queue
//! and start-up never fails on it.

use std::time::Duration;

use crate::support::{PrivateBroker, TestEnv, eventually};

/// What the broker says is in force on `queue`: its declare arguments and its policy.
async fn in_force(env: &TestEnv, queue: &str) -> (serde_json::Value, serde_json::Value) {
    let management = env.cfg.management().unwrap().expect("a management URL");
    let q = management.queue(queue).await.unwrap();
    (
        q["arguments"].clone(),
        q["effective_policy_definition"].clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_tunables_are_applied_as_policies_without_breaking_start_up() {
    let (rabbit, management_url) = PrivateBroker::start_with_management().await;
    let mut env = TestEnv::new("policies");
    env.cfg.amqp_url = rabbit.url();
    env.cfg.broker_management_url = Some(management_url);
    env.start_edge("e1").await;
    env.start_worker("w1").await;

    let work = env.name("frames.work");
    let (arguments, policy) =
        eventually("the work queue's policy", Duration::from_secs(20), || {
            let (env, work) = (&env, &work);
            async move {
                let (a, p) = in_force(env, work).await;
                (p["message-ttl"] == 5000).then_some((a, p))
            }
        })
        .await;
    assert_eq!(policy["overflow"], "drop-head", "{policy}");
    assert_eq!(policy["dead-letter-exchange"], env.name("dead"), "{policy}");
    // Only what a policy cannot set is an argument.
    assert_eq!(arguments["x-queue-type"], "quorum", "{arguments}");
    assert!(arguments.get("x-message-ttl").is_none(), "{arguments}");
    assert!(arguments.get("x-max-length").is_none(), "{arguments}");

    // An operator changes the TTL and the length limit in the topology file, and a node
    // (re)starts with it: no PRECONDITION_FAILED, and the live queue follows.
    let text = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/exchanges.toml"))
        .replacen("message_ttl_ms = 5000", "message_ttl_ms = 7000", 1)
        .replacen("max_length = 2000", "max_length = 3000", 1);
    std::fs::create_dir_all(&env.clients_dir).unwrap();
    let changed = env.clients_dir.join("exchanges.changed.toml");
    std::fs::write(&changed, text).unwrap();
    env.cfg.topology_file = Some(changed);
    env.start_edge("e2").await;
    // The management API refreshes what it shows of a queue every few seconds.
    eventually(
        "the changed policy in force",
        Duration::from_secs(20),
        || {
            let (env, work) = (&env, &work);
            async move {
                let (_, p) = in_force(env, work).await;
                (p["message-ttl"] == 7000 && p["max-length"] == 3000).then_some(())
            }
        },
    )
    .await;

    // The same change without policies is what used to break start-up.
    let mut by_arguments = env.cfg.clone();
    by_arguments.broker_management_url = None;
    by_arguments.edge.id = Some("e3".into());
    let refused = vigil::edge::start(
        by_arguments,
        prometheus::Registry::new(),
        env.shutdown.clone(),
    )
    .await;
    let error = refused
        .err()
        .expect("declaring other arguments is refused")
        .to_string();
    assert!(
        error.contains("PRECONDITION_FAILED") || error.contains("inequivalent"),
        "{error}"
    );

    env.teardown().await;
    rabbit.stop();
}

/// `Some` once `queue` has the work queue's policy in force.
async fn has_policy(env: &TestEnv, queue: &str) -> Option<()> {
    (in_force(env, queue).await.1["message-ttl"] == 5000).then_some(())
}

/// A worker that reconnects puts the shared queues' policies again, as at start-up: the
/// policies are deleted while it runs (a broker rebuilt from scratch, an operator's mistake),
/// every connection is closed, and the reconnected worker alone restores them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_worker_puts_its_policies_again() {
    let (rabbit, management_url) = PrivateBroker::start_with_management().await;
    let mut env = TestEnv::new("policies-relink");
    env.cfg.amqp_url = rabbit.url();
    env.cfg.broker_management_url = Some(management_url);
    env.start_worker("w1").await;
    let work = env.name("frames.work");
    eventually(
        "the policy put at start-up",
        Duration::from_secs(20),
        || has_policy(&env, &work),
    )
    .await;

    let management = env.cfg.management().unwrap().expect("a management URL");
    let names: Vec<String> = env
        .cfg
        .topology()
        .unwrap()
        .shared(&env.cfg.namespace)
        .policies()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert!(!names.is_empty());
    management.delete_policies(&names).await.unwrap();
    eventually("the policy gone", Duration::from_secs(20), || {
        let (env, work) = (&env, &work);
        async move {
            in_force(env, work)
                .await
                .1
                .get("message-ttl")
                .is_none()
                .then_some(())
        }
    })
    .await;

    assert!(rabbit.ctl(&["close_all_connections", "test: reconnect"]));
    eventually(
        "the policy put again by the reconnected worker",
        Duration::from_secs(30),
        || has_policy(&env, &work),
    )
    .await;

    env.teardown().await;
    rabbit.stop();
}
