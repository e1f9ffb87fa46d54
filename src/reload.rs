//! SIGHUP: re-read `hub.toml` and put new routes and a new device registry in force without a
//! restart.
//!
//! A bad file keeps the running configuration (logged at ERROR with the key and the fix). A
//! good one replaces the workers' [`Routing`] whole: a message already being verified finishes
//! under the routing it started with, every later one uses the new routing, so none is dropped
//! or processed twice. Then new filters are subscribed and removed ones unsubscribed (in that
//! order, after the swap, so a message on a new filter always finds its route). Other sections
//! need a restart; a reload that changes them says so at WARN.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::mqtt::{Client, Subscriptions};
use crate::pipeline::{Routing, Shared};

/// How the hub learns of reload requests and re-reads its configuration.
pub struct Reload {
    /// One message per request (SIGHUP); requests that arrive during a reload coalesce.
    pub requests: tokio::sync::mpsc::Receiver<()>,
    /// Reads and validates the configuration again (file plus environment overrides).
    pub load: Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>,
}

/// What a reload changes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Filters to subscribe (new, or with a changed QoS).
    pub subscribe: Vec<(String, u8)>,
    /// Filters no route needs any more.
    pub unsubscribe: Vec<String>,
    /// Whether any route changed (filters, trust, mapping, report topic).
    pub routes_changed: bool,
    /// Registered DIDs added.
    pub devices_added: usize,
    /// Registered DIDs removed.
    pub devices_removed: usize,
    /// Registered DIDs whose name or tags changed.
    pub devices_changed: usize,
    /// Sections that changed but only take effect after a restart.
    pub restart_needed: Vec<&'static str>,
}

/// Compares the running configuration with a new one (pure).
pub fn plan(old: &Config, new: &Config) -> Plan {
    let old_subs: BTreeMap<String, u8> = Routing::new(old).subscriptions().into_iter().collect();
    let new_subs = Routing::new(new).subscriptions();
    let new_filters: BTreeSet<&str> = new_subs.iter().map(|(f, _)| f.as_str()).collect();
    let subscribe = new_subs
        .iter()
        .filter(|(f, q)| old_subs.get(f) != Some(q))
        .cloned()
        .collect();
    let unsubscribe = old_subs
        .keys()
        .filter(|f| !new_filters.contains(f.as_str()))
        .cloned()
        .collect();
    let dbg = |v: &dyn std::fmt::Debug| format!("{v:?}");
    let devices = |c: &Config| -> BTreeMap<String, String> {
        c.devices.iter().map(|d| (d.did.clone(), dbg(d))).collect()
    };
    let (od, nd) = (devices(old), devices(new));
    // Secrets print as *** in Debug, so a changed password alone is not noticed here.
    let sections: [(&'static str, String, String); 12] = [
        ("state_dir", dbg(&old.state_dir), dbg(&new.state_dir)),
        ("identity", dbg(&old.identity), dbg(&new.identity)),
        ("mqtt", dbg(&old.mqtt), dbg(&new.mqtt)),
        ("broker", dbg(&old.broker), dbg(&new.broker)),
        ("store", dbg(&old.store), dbg(&new.store)),
        ("outbox", dbg(&old.outbox), dbg(&new.outbox)),
        (
            "stats_interval",
            dbg(&old.stats_interval),
            dbg(&new.stats_interval),
        ),
        ("limits", dbg(&old.limits), dbg(&new.limits)),
        ("pipeline", dbg(&old.pipeline), dbg(&new.pipeline)),
        ("reports", dbg(&old.reports), dbg(&new.reports)),
        ("log", dbg(&old.log), dbg(&new.log)),
        ("http", dbg(&old.http), dbg(&new.http)),
    ];
    Plan {
        subscribe,
        unsubscribe,
        routes_changed: dbg(&old.routes) != dbg(&new.routes),
        devices_added: nd.keys().filter(|k| !od.contains_key(*k)).count(),
        devices_removed: od.keys().filter(|k| !nd.contains_key(*k)).count(),
        devices_changed: nd
            .iter()
            .filter(|(k, v)| od.get(*k).is_some_and(|o| o != *v))
            .count(),
        restart_needed: sections
            .into_iter()
            .filter(|(_, a, b)| a != b)
            .map(|(name, _, _)| name)
            .collect(),
    }
}

/// Serves reload requests until `shutdown`.
pub async fn watch(
    mut reload: Reload,
    mut running: Config,
    shared: Arc<Shared>,
    client: Client,
    subscriptions: Subscriptions,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = reload.requests.recv() => if r.is_none() { return },
        }
        tracing::info!("reload requested: reading the configuration again");
        crate::systemd::reloading();
        match (reload.load)() {
            Err(e) => {
                tracing::error!(error = %e, "configuration reload failed; the running configuration stays in force");
                crate::systemd::reloaded(&format!("reload failed: {e}"));
            }
            Ok(new) => {
                let p = apply(&running, &new, &shared, &client, &subscriptions);
                crate::systemd::reloaded(&format!(
                    "reloaded: {} route(s), {} device(s)",
                    new.routes.len(),
                    new.devices.len()
                ));
                if !p.restart_needed.is_empty() {
                    tracing::warn!(
                        sections = ?p.restart_needed,
                        "these sections changed but take effect only after a restart"
                    );
                }
                running = new;
            }
        }
    }
}

/// Puts `new`'s routes and registry in force and adjusts the subscriptions.
pub fn apply(
    old: &Config,
    new: &Config,
    shared: &Shared,
    client: &Client,
    subscriptions: &Subscriptions,
) -> Plan {
    let p = plan(old, new);
    let routing = Routing::new(new);
    let subs = routing.subscriptions();
    shared.replace_routing(routing);
    *subscriptions.lock().unwrap_or_else(|e| e.into_inner()) = subs;
    for (filter, qos) in &p.subscribe {
        crate::mqtt::subscribe(client, filter, *qos);
    }
    for filter in &p.unsubscribe {
        if let Err(e) = client.try_unsubscribe(filter) {
            tracing::error!(filter = %filter, error = ?e, "could not unsubscribe");
        }
    }
    tracing::info!(
        routes = new.routes.len(),
        routes_changed = p.routes_changed,
        devices = new.devices.len(),
        devices_added = p.devices_added,
        devices_removed = p.devices_removed,
        devices_changed = p.devices_changed,
        subscribed = ?p.subscribe.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>(),
        unsubscribed = ?p.unsubscribe,
        "configuration reloaded: routes and device registry in force"
    );
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        Config::from_toml(extra, "t", &[]).unwrap()
    }

    #[test]
    fn plan_diffs_filters_devices_and_restart_sections() {
        let old = cfg(
            "[[routes]]\ntopics = [\"a/+\", \"b/#\"]\n[[devices]]\ndid = \"did:key:z1\"\n\
             [[devices]]\ndid = \"did:key:z2\"\nname = \"x\"\n",
        );
        let new = cfg(
            "[mqtt]\nkeep_alive = \"10s\"\n[[routes]]\ntopics = [\"a/+\", \"c/+\"]\n\
             [[routes]]\ntopics = [\"b/#\"]\nqos = 0\n\
             [[devices]]\ndid = \"did:key:z2\"\nname = \"y\"\n[[devices]]\ndid = \"did:key:z3\"\n",
        );
        let p = plan(&old, &new);
        assert_eq!(
            p.subscribe,
            vec![("c/+".to_string(), 1), ("b/#".to_string(), 0)]
        );
        assert!(p.unsubscribe.is_empty());
        assert!(p.routes_changed);
        assert_eq!(
            (p.devices_added, p.devices_removed, p.devices_changed),
            (1, 1, 1)
        );
        assert_eq!(p.restart_needed, vec!["mqtt"]);

        let back = plan(&new, &old);
        assert_eq!(back.unsubscribe, vec!["c/+".to_string()]);
        assert_eq!(back.subscribe, vec![("b/#".to_string(), 1)]);

        let same = plan(&old, &old);
        assert_eq!(same, Plan::default());
    }
}
