//! Smoke tests of the test harness itself: the real mosquitto and VictoriaMetrics behave as the
//! hub's integration tests assume, and every process a test starts is gone when it ends.
//! They need the servers only, not the didhub binary's features.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    mqtt_publish, mqtt_subscribe_collect, pid_alive, Collector, Mosquitto, SubOptions, Victoria,
};

/// Panics unless none of `pids` names a live process any more.
fn assert_all_gone(pids: &[u32]) {
    for pid in pids {
        assert!(!pid_alive(*pid), "process {pid} outlived its guard");
    }
}

fn now_ms() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    i64::try_from(since.as_millis()).expect("ms fit i64")
}

#[test]
fn mosquitto_roundtrip_through_collector() {
    let started = Instant::now();
    let pids;
    {
        let broker = Mosquitto::start();
        assert_eq!(broker.url(), format!("mqtt://127.0.0.1:{}", broker.port));
        let sub = mqtt_subscribe_collect(broker.port, "smoke/#");

        mqtt_publish(broker.port, "smoke/a", b"hello", 1, false);
        mqtt_publish(broker.port, "smoke/b", b"two\nlines", 1, false);
        mqtt_publish(broker.port, "smoke/c", br#"{"k":[1,2]}"#, 0, false);
        mqtt_publish(broker.port, "other/x", b"not subscribed", 1, false);

        let got = sub.wait_for_messages(3, Duration::from_secs(10));
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0].topic, "smoke/a");
        assert_eq!(got[0].payload, b"hello");
        assert_eq!(got[0].qos, 1);
        assert_eq!(
            got[1].payload, b"two\nlines",
            "payload with a newline survives"
        );
        assert_eq!(got[2].json()["k"][1], 2);
        assert_eq!(got[2].qos, 0);
        assert_eq!(sub.lines()[0], "smoke/a hello");

        pids = [broker.pid().expect("running"), sub.pid().expect("running")];
        assert!(pids.iter().all(|p| pid_alive(*p)));
    }
    assert_all_gone(&pids);
    eprintln!(
        "mosquitto_roundtrip_through_collector: {:?}",
        started.elapsed()
    );
}

#[test]
fn mosquitto_persistence_keeps_queued_qos1_across_restart() {
    let started = Instant::now();
    let mut pids = Vec::new();
    {
        let mut broker = Mosquitto::start();
        let port = broker.port;
        let opts = SubOptions {
            client_id: Some("smoke-persistent".into()),
            persistent: true,
            ..SubOptions::default()
        };

        // Create the persistent session, then go offline.
        let mut sub = Collector::start(port, &["persist/#"], &opts);
        pids.push(sub.pid().expect("running"));
        sub.stop();

        // Queued for the offline session, then the broker restarts.
        mqtt_publish(port, "persist/queued", b"while you were away", 1, false);
        pids.push(broker.pid().expect("running"));
        let status = broker.stop().expect("was running");
        assert!(status.success(), "mosquitto exit on SIGTERM: {status}");
        assert!(
            broker.dir().join("mosquitto.db").is_file(),
            "no persistence file written: {:?}",
            broker.logs()
        );
        broker.start_again();
        assert_eq!(broker.port, port, "same port after restart");
        pids.push(broker.pid().expect("running again"));

        // Reconnecting with the same id gets the queued message from the saved session.
        let sub = Collector::start(port, &["persist/#"], &opts);
        pids.push(sub.pid().expect("running"));
        let got = sub.wait_for_messages(1, Duration::from_secs(10));
        assert_eq!(got[0].topic, "persist/queued");
        assert_eq!(got[0].text(), "while you were away");
        assert_eq!(got.len(), 1, "{got:?}");
    }
    assert_all_gone(&pids);
    eprintln!(
        "mosquitto_persistence_keeps_queued_qos1_across_restart: {:?}",
        started.elapsed()
    );
}

#[test]
fn victoria_accepts_influx_lines_and_dedups() {
    let started = Instant::now();
    let pids;
    {
        let mut vm = Victoria::start();
        assert_eq!(vm.url(), format!("http://127.0.0.1:{}", vm.port));

        // 2024-01-01T00:00:00Z: older than the default one-month retention.
        let old_ns: i64 = 1_704_067_200_000_000_000;
        let recent_ms = now_ms() - 1_000;
        let lines = format!(
            "smoke,device=d1 temp=21.5 {old_ns}\nsmoke,device=d1 temp=22.25 {}\n",
            recent_ms * 1_000_000
        );
        assert_eq!(vm.write_lines(&lines), 204);
        let series = vm.wait_for_samples(r#"smoke_temp{device="d1"}"#, 2, Duration::from_secs(20));
        assert_eq!(series.len(), 1, "{series:#?}");
        assert_eq!(series[0].name(), "smoke_temp");
        assert_eq!(series[0].label("device"), Some("d1"));
        assert_eq!(
            series[0].samples(),
            vec![(old_ns / 1_000_000, 21.5), (recent_ms, 22.25)]
        );
        assert_eq!(
            vm.export(r#"{__name__="smoke_temp"}"#)[0]["metric"]["device"],
            "d1"
        );

        // The same point twice (two requests), then a later one as a sentinel.
        let dup = format!("dup,device=d1 v=7 {}\n", recent_ms * 1_000_000);
        assert_eq!(vm.write_lines(&dup), 204);
        assert_eq!(vm.write_lines(&dup), 204);
        let sentinel = format!("dup,device=d1 v=8 {}\n", (recent_ms + 1) * 1_000_000);
        assert_eq!(vm.write_lines(&sentinel), 204);
        let series = vm.wait_for_samples("dup_v", 2, Duration::from_secs(20));
        assert_eq!(
            series[0].samples(),
            vec![(recent_ms, 7.0), (recent_ms + 1, 8.0)]
        );
        vm.assert_sample_count_stays("dup_v", 2, Duration::from_millis(1500));

        // Data survives a clean restart on the same port.
        let first_pid = vm.pid().expect("running");
        vm.stop();
        assert!(!pid_alive(first_pid));
        vm.start_again();
        let series = vm.wait_for_samples("smoke_temp", 2, Duration::from_secs(20));
        assert_eq!(series[0].values, vec![21.5, 22.25]);
        pids = [first_pid, vm.pid().expect("running again")];
    }
    assert_all_gone(&pids);
    eprintln!(
        "victoria_accepts_influx_lines_and_dedups: {:?}",
        started.elapsed()
    );
}

#[test]
fn a_panicking_test_leaves_no_server_behind() {
    let started = Instant::now();
    let pids = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let broker = Mosquitto::start();
        let sub = mqtt_subscribe_collect(broker.port, "#");
        pids.lock()
            .unwrap()
            .extend([broker.pid().expect("running"), sub.pid().expect("running")]);
        // Times out and panics: nothing is published.
        sub.wait_for(1, Duration::from_millis(300));
    });
    assert!(result.is_err(), "wait_for should have panicked");
    let pids = pids.into_inner().unwrap();
    assert_eq!(pids.len(), 2);
    assert_all_gone(&pids);
    eprintln!(
        "a_panicking_test_leaves_no_server_behind: {:?}",
        started.elapsed()
    );
}
