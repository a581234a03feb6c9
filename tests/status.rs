//! What `status` says about a certificate is correct and fresh (issue 23 item 5).
//! Real processes on 127.0.5.20–29.

use std::fs;

use crate::util::{wait_until, Node};

#[test]
fn a_failed_order_plans_the_next_one_in_the_future_never_1970() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = Node::new(dir.path(), "solo", "127.0.5.20");
    n.configure(&[]);
    let mut cfg = fs::read_to_string(&n.config).unwrap();
    // A CA that refuses every connection: the first order fails at once.
    cfg.push_str(
        "\n[acme]\ndirectory = \"https://127.0.5.21:9/directory\"\n\
         \n[[certificate]]\nname = \"www\"\ndomains = [\"www.example.com\"]\n",
    );
    fs::write(&n.config, cfg).unwrap();
    n.start();
    wait_until("the order failed", || {
        n.status()["certificates"][0]["failures"].as_u64() >= Some(1)
    });
    let st = n.status();
    let c = &st["certificates"][0];
    let now = st["node"]["now_unix"].as_i64().unwrap();
    let next = c["next_renewal_unix"].as_i64().expect("a next renewal");
    assert!(next >= now, "next renewal {next} before now {now}: {c}");
    assert!(
        !c["next_renewal"].as_str().unwrap().starts_with("1970"),
        "{c}"
    );
    assert_eq!(c["state"], "backoff", "{c}");
    // The failure is in errors[] as an ongoing condition, as in the table.
    let errors = st["errors"].as_array().unwrap();
    assert!(
        errors.iter().any(|e| e["ongoing"] == true
            && e["message"]
                .as_str()
                .unwrap()
                .starts_with("certificate www (1 failures)")),
        "{st}"
    );
    n.stop();
}
