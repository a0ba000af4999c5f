//! A parked server session that its server ended while it waited is closed when a
//! client would have had it, never handed out: the client gets a new session.
//! The proxy runs two relay threads, so the session is taken both on the thread
//! that parked it and on the other one.

use crate::harness::*;

const IDLE: &str = "offshoot_server_sessions_idle";
const HITS: &str = "offshoot_server_reuse_total{outcome=\"hit\"}";
const DISCARDS: &str = "offshoot_server_reuse_total{outcome=\"discard\"}";

async fn pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_session_its_server_ended_is_never_handed_out() {
    let Fixture { pg, proxy } = Fixture::start(Engine::Database, "").await;
    let direct = pg.direct("postgres").await;
    let first = proxy.connect("shop.gone").await.unwrap();
    let mut last = pid(&first).await;
    drop(first);
    for round in 0..2u8 {
        assert!(
            eventually(20, || proxy.metric(IDLE) == 1.0).await,
            "round {round}: the session was parked"
        );
        let ended: bool = direct
            .query_one("SELECT pg_terminate_backend($1, 10000)", &[&last])
            .await
            .unwrap()
            .get(0);
        assert!(ended, "round {round}: the parked backend was ended");
        if round == 1 {
            // A refused connection in between takes the next relay thread, so
            // this round's client lands on the other thread than the last one's.
            let _ = proxy.connect("nosuchsource.x").await;
        }
        let client = proxy.connect("shop.gone").await.unwrap();
        let now = pid(&client).await;
        assert_ne!(now, last, "round {round}: a new backend, not the ended one");
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
        assert_eq!(proxy.metric(HITS), 0.0, "round {round}");
        assert_eq!(proxy.metric(DISCARDS), f64::from(round) + 1.0);
        last = now;
        drop(client);
    }
}
