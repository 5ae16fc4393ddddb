//! One short connection that tests a broker's settings (`mqtt_test_connection`): connect with
//! the options the worker would use, wait for the CONNACK, say goodbye, and report what
//! happened in the words the worker's status uses.
//!
//! It must never disturb the worker's own connection to the same broker, so it differs from it
//! in exactly what the broker keys state by: its own random client id (the worker's would make
//! the broker close the worker's connection, a "session takeover"), a clean session (the broker
//! keeps nothing after it), no Last Will (a probe cut off by its timeout would otherwise have
//! the broker publish the worker's "offline" message) and no subscriptions. Everything else
//! (address, credentials, TLS, keepalive, packet limits) is the worker's, built by the same
//! functions, so a probe that succeeds means the worker's connection can too.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::{Duration, Instant};

use super::errors::{describe_error, describe_timeout};
use super::options::prepare;
use super::wire::{Loop, Wire};
use super::{BrokerConfig, DISCONNECT_GRACE};

/// What one test connection found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// The broker accepted the connection.
    pub ok: bool,
    /// The CONNACK's return code as rumqttc names it (`Success`, `BadUserNamePassword`,
    /// `NotAuthorized`, ...); `None` when no CONNACK came.
    pub connack: Option<String>,
    /// The CONNACK's session-present flag (always false for the clean session asked for).
    pub session_present: Option<bool>,
    /// Why it failed, worded as `mqtt_status` words a connection error. Never holds a secret.
    pub error: Option<String>,
    /// The connection was (to be) made over TLS.
    pub tls: bool,
    /// From the start of the attempt (name lookup, TCP, TLS handshake, CONNECT) to the CONNACK,
    /// or to the failure.
    pub round_trip: Duration,
    /// The client id the probe connected with.
    pub client_id: String,
}

/// The probe's configuration: the broker's, without anything that would touch the worker's
/// session (see the module documentation).
pub fn probe_config(broker: &BrokerConfig) -> BrokerConfig {
    BrokerConfig {
        client_id: crate::client_id::probe_client_id(&broker.client_id),
        clean_session: true,
        session_expiry: Some(0),
        will: None,
        birth_payload: None,
        ..broker.clone()
    }
}

/// Connect once to `broker` (a worker's configuration) with [`probe_config`], within `timeout`,
/// and disconnect cleanly after the CONNACK. A failure is an outcome, not an error.
pub async fn probe(broker: &BrokerConfig, timeout: Duration) -> ProbeOutcome {
    let c = probe_config(broker);
    let start = Instant::now();
    let mut outcome = ProbeOutcome {
        ok: false,
        connack: None,
        session_present: None,
        error: None,
        tls: c.tls.is_some(),
        round_trip: Duration::ZERO,
        client_id: c.client_id.clone(),
    };
    let (client, mut eventloop) = Loop::new(&c, 8);
    // rumqttc has a connect timeout of its own, in whole seconds: keep it out of the way so
    // that `timeout` is the one that counts.
    eventloop.set_connection_timeout(timeout.as_secs().saturating_add(1));
    if let Err(error) = prepare(&c, &mut eventloop, &mut false) {
        outcome.error = Some(error);
        outcome.round_trip = start.elapsed();
        return outcome;
    }
    let connack = tokio::time::timeout(timeout, async {
        loop {
            match eventloop.poll().await {
                Ok(Wire::ConnAck {
                    session_present,
                    code,
                    ..
                }) => return Ok((code, session_present)),
                // rumqttc reads the CONNACK before anything else; nothing of ours is queued
                // before it either. Not a verdict either way.
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    outcome.round_trip = start.elapsed();
    let failure = match connack {
        Ok(Ok((code, session_present))) => {
            outcome.ok = true;
            outcome.connack = Some(code);
            outcome.session_present = Some(session_present);
            None
        }
        Ok(Err(e)) => {
            outcome.connack = e.refused_code();
            Some(describe_error(&e, &c, false))
        }
        // The worker's words for a broker that does not answer in time.
        Err(_) => Some(describe_timeout(&c)),
    };
    if let Some(error) = failure {
        outcome.error = Some(error);
        return outcome;
    }
    // A clean goodbye, so the broker logs a disconnect rather than a lost client; bounded as
    // the worker's is at shutdown.
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(DISCONNECT_GRACE, async {
            loop {
                match eventloop.poll().await {
                    Ok(Wire::SentDisconnect) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    outcome
}

/// Runs [`probe`] on the calling thread, a slice at a time, for a caller that must regain
/// control every few milliseconds (a PostgreSQL backend honouring query cancel and
/// statement_timeout between slices). The runtime is a current-thread one: the probe's I/O runs
/// on the caller's thread, only inside [`Prober::run_for`]. tokio may start a thread of its
/// blocking pool for a host name lookup; it inherits the signal mask of the thread calling
/// `run_for`.
pub struct Prober {
    runtime: Option<tokio::runtime::Runtime>,
    /// None once the outcome has been handed out.
    task: Option<Pin<Box<dyn Future<Output = ProbeOutcome>>>>,
}

impl Prober {
    /// Prepare a probe of `broker` (nothing is sent before the first [`Prober::run_for`]).
    pub fn new(broker: &BrokerConfig, timeout: Duration) -> io::Result<Prober> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let broker = broker.clone();
        Ok(Prober {
            runtime: Some(runtime),
            task: Some(Box::pin(async move { probe(&broker, timeout).await })),
        })
    }

    /// Drive the probe for at most `slice`: its outcome once it is done, else None. After the
    /// outcome has been returned, always None.
    pub fn run_for(&mut self, slice: Duration) -> Option<ProbeOutcome> {
        let (Some(runtime), Some(task)) = (self.runtime.as_ref(), self.task.as_mut()) else {
            return None;
        };
        let done = runtime.block_on(async { tokio::time::timeout(slice, task.as_mut()).await });
        let outcome = done.ok()?;
        self.task = None;
        Some(outcome)
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        // The unfinished probe (a cancelled call) closes its socket as it goes, inside the
        // runtime it belongs to.
        {
            let _inside = runtime.enter();
            self.task = None;
        }
        // A host name lookup in tokio's blocking pool cannot be interrupted, and dropping the
        // runtime would wait for it: let it finish on its own (it only resolves a name)
        // instead of keeping the caller, who may be cancelling, waiting.
        runtime.shutdown_background();
    }
}
