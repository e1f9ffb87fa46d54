//! The embedded MQTT broker (rumqttd), for a hub that runs alone on one machine.
//!
//! rumqttd 0.20 cannot report an OS-chosen port and has no shutdown: it runs on its own thread
//! for the life of the process, on the configured loopback address. Its sessions live in
//! memory, so delivery-guarantee tests use mosquitto.

use std::net::SocketAddr;

/// Starts the broker on `listen`; fails if the address is taken.
pub fn start(listen: SocketAddr, max_payload: usize) -> Result<(), String> {
    // Fail early and clearly if the port is taken: rumqttd would only log it on its thread.
    std::net::TcpListener::bind(listen).map_err(|e| {
        format!("broker.listen {listen}: {e}; pick a free port or set broker.embedded = false")
    })?;
    let toml = format!(
        r#"
id = 0
[router]
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "{listen}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = {max_payload}
max_inflight_count = 1000
dynamic_filters = true
"#
    );
    let cfg: rumqttd::Config = config::Config::builder()
        .add_source(config::File::from_str(&toml, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| format!("embedded broker config: {e}"))?;
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(cfg);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the embedded MQTT broker stopped");
            }
        })
        .map_err(|e| format!("cannot start the embedded broker thread: {e}"))?;
    // No readiness probe: a bare TCP connect makes rumqttd log an error, and the hub's MQTT
    // client retries with backoff until the broker listens.
    Ok(())
}
