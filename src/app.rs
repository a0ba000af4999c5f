//! Builds everything from a [`Config`], supervises the tasks, and drains on shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::auth::Credentials;
use crate::branch::engine::database::DatabaseEngine;
use crate::branch::engine::instance;
use crate::branch::engine::transform::Transform;
use crate::branch::engine::Engine;
use crate::branch::store::Store;
use crate::branch::{reaper, schedule};
use crate::branch::{Registry, Source};
use crate::clock::Clock;
use crate::config::{Config, EngineConfig, RouteBy, TlsConfig};
use crate::embedded::Embedded;
use crate::metrics::Metrics;
use crate::privsep::{self, Plan};
use crate::proxy::{listener, tls, Access, AuthMethods, ClientTls, Proxy};

/// The privileged helper's `main` (see `privsep`): logs to stderr, serves the
/// proxy's requests until it closes the pipe.
pub fn helper_main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match privsep::helper_main(instance::privileged::Helper::new) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %format!("{e:#}"), "privileged helper failed");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Started as root: gives the proxy's user its directories and starts the helper,
/// which may act below the state directory, the sources' storage and the data
/// directories snapshots are copied from.
fn separate(cfg: &Config, state_dir: &std::path::Path) -> Result<Option<Plan>> {
    let Some(plan) = privsep::plan(&cfg.process.user, &cfg.process.all_server_users())? else {
        return Ok(None);
    };
    let absolute = |p: &std::path::Path| -> Result<PathBuf> {
        Ok(if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()?.join(p)
        })
    };
    plan.own_dir(state_dir).context("state.dir")?;
    plan.own_records(state_dir)
        .context("state.dir: giving branch records to process.user")?;
    let mut roots = vec![state_dir.to_path_buf()];
    for (name, scfg) in &cfg.sources {
        let EngineConfig::Instance(icfg) = &scfg.engine else {
            continue;
        };
        if let Some(storage) = &icfg.storage {
            let storage = absolute(storage)?;
            plan.own_dir(&storage)
                .with_context(|| format!("sources.{name}.storage"))?;
            roots.push(storage.canonicalize()?);
        }
        if let Some(dir) = &icfg.data_dir {
            roots.push(absolute(dir)?);
        }
    }
    plan.start_helper(roots, cfg.embedded.bin_dir.clone())?;
    Ok(Some(plan))
}

/// Runs the proxy until `shutdown` is cancelled, then drains and stops. `banner`:
/// tell a person on stderr where everything is once ready (off when the log is
/// JSON, which must stay one object per line).
pub async fn run(cfg: Config, banner: bool, shutdown: CancellationToken) -> Result<()> {
    crate::pg::set_server_user(&cfg.process.server_user);
    crate::pg::set_server_uids(
        cfg.process
            .all_server_users()
            .into_iter()
            .filter_map(|u| nix::unistd::User::from_name(u).ok().flatten())
            .map(|u| u.uid.as_raw())
            .collect(),
    );
    std::fs::create_dir_all(&cfg.state.dir)
        .with_context(|| format!("state.dir: cannot create {}", cfg.state.dir.display()))?;
    let state_dir: PathBuf = cfg.state.dir.canonicalize()?;
    let plan = separate(&cfg, &state_dir)?;
    let metrics = Arc::new(Metrics::new());

    let embedded = if cfg.needs_embedded() {
        let ecfg = cfg.embedded.clone();
        let dir = state_dir.clone();
        Some(
            tokio::task::spawn_blocking(move || Embedded::start(&ecfg, &dir))
                .await?
                .context("embedded PostgreSQL")?,
        )
    } else {
        None
    };
    let result = serve(
        &cfg,
        &state_dir,
        metrics,
        embedded.as_ref(),
        plan,
        banner,
        shutdown,
    )
    .await;
    if let Some(e) = embedded {
        if let Err(err) = tokio::task::spawn_blocking(move || e.stop()).await? {
            error!(error = %err, "could not stop embedded PostgreSQL");
        }
    }
    result
}

async fn serve(
    cfg: &Config,
    state_dir: &std::path::Path,
    metrics: Arc<Metrics>,
    embedded: Option<&Embedded>,
    plan: Option<Plan>,
    banner: bool,
    shutdown: CancellationToken,
) -> Result<()> {
    // The one clock of the control plane: the registry, the reaper and the engines.
    let clock = Clock::system();
    // First what may need root: the sources' servers and roles, the keys, the
    // listeners. Then, when separated, root is dropped before anything is built
    // that clients reach or that writes the proxy's state.
    let mut servers = Vec::new();
    let mut auth_servers = Vec::new();
    let mut upstreams = std::collections::HashMap::new();
    for (name, scfg) in &cfg.sources {
        let upstream = crate::upstream::Upstream::new(scfg.server_tls, scfg.server_ca.as_deref())
            .with_context(|| format!("sources.{name}"))?;
        let db = scfg.database_name(name.as_str()).to_owned();
        let server = match (scfg.server(), embedded) {
            (Some(s), _) => s.to_owned(),
            (None, Some(e)) if scfg.uses_embedded() => {
                e.ensure_database(&db, scfg.seed_demo)
                    .await
                    .with_context(|| format!("sources.{name}: preparing database {db:?}"))?;
                e.server_string()
            }
            (None, _) if !scfg.uses_embedded() => String::new(),
            (None, _) => unreachable!("the embedded server runs when a source needs it"),
        };
        auth_servers.push((
            name.to_string(),
            // Roles of an instance source are those of the server its snapshots
            // come from.
            scfg.auth_server
                .clone()
                .or_else(|| scfg.upstream().map(str::to_owned))
                .unwrap_or_else(|| server.clone()),
            upstream.clone(),
        ));
        // Transform files are read here, before root is dropped, so the
        // proxy user needs no access to them.
        let transforms = scfg
            .snapshot_transform
            .iter()
            .map(|p| Transform::load(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow!("sources.{name}.snapshot_transform: {e}"))?;
        upstreams.insert(name.to_string(), upstream.clone());
        servers.push((name, scfg, db, server, upstream, transforms));
    }

    let tls = match (&cfg.tls.cert, &cfg.tls.key) {
        (Some(cert), Some(key)) if cfg.tls.enabled() => Some(tls::load(cert, key)?),
        _ => None,
    };
    let mock_key = crate::auth::load_secret(&state_dir.join("auth.key"))
        .context("state.dir: the key of mock verifiers")?;
    let credentials = Arc::new(Credentials::new(
        cfg.auth.query.clone(),
        cfg.auth.users_file.clone(),
        auth_servers,
        mock_key,
        cfg.auth.max_scram_iterations,
    )?);
    let listener = TcpListener::bind(cfg.proxy.listen)
        .await
        .map_err(|e| anyhow!("proxy.listen: cannot bind {}: {e}", cfg.proxy.listen))?;
    let admin = match cfg.admin.enabled {
        true => Some(crate::admin::bind(cfg).await?),
        false => None,
    };
    // Webhook secrets are keys too: read while still root.
    let hooks = crate::audit::Webhooks::start(&cfg.webhooks, clock.clone(), metrics.clone())
        .map_err(|e| anyhow!(e))?;
    if let Some(plan) = plan {
        plan.drop_privileges()?;
    }

    let mut sources = Vec::new();
    // Instance engines, whose warm spares are filled in the background.
    let mut instances = Vec::new();
    for (name, scfg, db, server, upstream, transforms) in servers {
        let engine: Arc<dyn Engine> = match &scfg.engine {
            EngineConfig::Instance(icfg) => {
                let embedded_conn = scfg.uses_embedded().then(|| server.clone());
                let bin = crate::pg::PgBin::find(cfg.embedded.bin_dir.as_deref())?
                    .for_user(cfg.process.server_user_for(name.as_str()))?;
                let (source, db, icfg) = (name.clone(), db.clone(), icfg.clone());
                let state_dir = state_dir.to_path_buf();
                let clock = clock.clone();
                let metrics = metrics.clone();
                let engine = tokio::task::spawn_blocking(move || {
                    instance::build(
                        &source,
                        &db,
                        &icfg,
                        embedded_conn,
                        bin,
                        &state_dir,
                        clock,
                        transforms,
                        &metrics,
                    )
                })
                .await??;
                instances.push(engine.clone());
                engine
            }
            EngineConfig::Database(dcfg) => {
                let engine = DatabaseEngine::new(&server, &db, &upstream, clock.clone())
                    .map_err(|e| anyhow!("sources.{name}.server: {e}"))?
                    .for_source(name.as_str())
                    .with_strategy(dcfg.clone_strategy)
                    .with_transforms(transforms);
                if let Err(e) = engine.check_template().await {
                    warn!(source = %name, error = %e, "source is not usable yet; clients will get this error");
                }
                Arc::new(engine)
            }
        };
        sources.push(Source::new(name.clone(), scfg.clone(), engine));
    }

    let store = Store::open(state_dir).context("state.dir: branch records")?;
    let audit = crate::audit::Audit::start(
        state_dir,
        crate::audit::Rotation::default(),
        hooks,
        clock.clone(),
        metrics.clone(),
    )
    .context("state.dir: the audit trail")?;
    let registry = Arc::new(
        Registry::new(sources, store, metrics.clone(), clock.clone()).with_audit(audit.clone()),
    );
    registry.adopt().await.context("reading branch records")?;

    let proxy = Arc::new(Proxy::new(
        cfg.proxy.clone(),
        registry.clone(),
        metrics.clone(),
        ClientTls::new(tls, &cfg.tls),
        Access::new(
            credentials,
            AuthMethods::from_config(cfg, &mock_key),
            upstreams,
        ),
    )?);

    let tasks = CancellationToken::new();
    let mut handles = Vec::new();
    let mut token_path = None;
    if let Some(admin) = admin {
        token_path = Some(admin.token_path().to_owned());
        let history = Arc::new(crate::history::History::new(HISTORY_SAMPLES));
        handles.push(
            tokio::spawn(crate::console::record_history(
                registry.clone(),
                metrics.clone(),
                history.clone(),
                HISTORY_EVERY,
                tasks.clone(),
            ))
            .abort_handle(),
        );
        let console = Arc::new(crate::console::Console {
            registry: registry.clone(),
            history,
            reach: reach(cfg, embedded),
            gate: admin.gate(),
            rehearsals: cfg.state.dir.join("rehearsals"),
        });
        info!(addr = %cfg.admin.listen, "admin HTTP listening");
        handles.push(
            tokio::spawn(crate::admin::serve(
                admin,
                registry.clone(),
                metrics.clone(),
                cfg.proxy.provision_timeout,
                console,
                tasks.clone(),
            ))
            .abort_handle(),
        );
    }
    let reaper = tokio::spawn(reaper::run(
        registry.clone(),
        cfg.reaper.interval,
        cfg.reaper.size_interval,
        tasks.clone(),
    ));
    let schedule = tokio::spawn(schedule::run(registry.clone(), tasks.clone()));
    for e in &instances {
        e.keep_spare_sessions(proxy.pool());
    }
    let spares: Vec<_> = instances
        .iter()
        .map(|e| tokio::spawn(e.clone().run_spares(tasks.clone())))
        .collect();
    handles.push(tokio::spawn(proxy.pool().run(tasks.clone())).abort_handle());
    let accept = listener::start(proxy.clone(), listener, tasks.clone())
        .context("proxy.listen: cannot hand the listener to a relay thread")?;
    handles.push(tokio::spawn(reload_on_sighup(cfg.tls.clone(), proxy.clone())).abort_handle());
    announce(cfg, embedded, token_path.as_deref(), banner);

    shutdown.cancelled().await;
    info!("shutting down: no new connections");
    registry.begin_shutdown();
    tasks.cancel();
    let _ = accept.await;
    let deadline = tokio::time::Instant::now() + cfg.proxy.shutdown_grace;
    while proxy.open_connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = proxy.open_connections();
    if left > 0 {
        warn!(
            connections = left,
            "grace period over; closing remaining connections"
        );
        // Closing a socket does not stop a statement the server is busy with.
        let cancelled = proxy.cancel_all().await;
        info!(
            cancelled,
            "cancelled running statements of the remaining sessions"
        );
    }
    let _ = reaper.await;
    let _ = schedule.await;
    // Branch servers are stopped with the proxy; their data stays, and the next
    // connection after a restart starts them again.
    registry.suspend_all().await;
    // Warm spares' servers too, once nothing is making more of them.
    for (task, engine) in spares.into_iter().zip(&instances) {
        let _ = task.await;
        engine.stop_spares().await;
    }
    audit.sync().await;
    for h in handles {
        h.abort();
    }
    Ok(())
}

/// Re-reads the TLS certificate and key and the users file on every SIGHUP.
/// Connections already open keep the session they negotiated; a file that does not
/// load leaves the previous one in place.
async fn reload_on_sighup(tls_cfg: TlsConfig, proxy: Arc<Proxy>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => return warn!(error = %e, "cannot watch SIGHUP; reload disabled"),
    };
    while hup.recv().await.is_some() {
        proxy.reload_credentials();
        let (Some(cert), Some(key)) = (&tls_cfg.cert, &tls_cfg.key) else {
            continue;
        };
        if !tls_cfg.enabled() {
            continue;
        }
        match tls::load(cert, key) {
            Ok(loaded) => {
                proxy.replace_certificate(loaded);
                info!(cert = %cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                error!(error = %format!("{e:#}"), "TLS reload failed; keeping the previous certificate")
            }
        }
    }
}

/// The console's charts: one sample every 10 s, an hour of them.
const HISTORY_EVERY: Duration = Duration::from_secs(10);
const HISTORY_SAMPLES: usize = 360;

/// Where clients reach the proxy, for the console's connection strings.
fn reach(cfg: &Config, embedded: Option<&Embedded>) -> crate::console::Reach {
    crate::console::Reach {
        addr: client_addr(cfg.proxy.listen),
        route_by: cfg.proxy.route_by,
        separator: cfg.proxy.separator.clone(),
        user: embedded.map_or("postgres", |e| e.user.as_str()).to_owned(),
    }
}

/// A wildcard listener is reached through some concrete address; loopback works
/// on the machine itself.
fn client_addr(mut addr: std::net::SocketAddr) -> std::net::SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    addr
}

/// Tells a new user how to connect, where the console is and what to try.
fn announce(
    cfg: &Config,
    embedded: Option<&Embedded>,
    token: Option<&std::path::Path>,
    banner: bool,
) {
    let user = embedded.map_or("postgres", |e| e.user.as_str());
    let sep = &cfg.proxy.separator;
    let addr = client_addr(cfg.proxy.listen);
    let url = cfg
        .sources
        .keys()
        .next()
        .map(|name| match cfg.proxy.route_by {
            RouteBy::Database => format!("postgres://{user}@{addr}/{name}{sep}pr-42"),
            RouteBy::User => format!("postgres://{user}{sep}pr-42@{addr}/{name}"),
        });
    let console = cfg
        .admin
        .enabled
        .then(|| format!("http://{}/", client_addr(cfg.admin.listen)));
    match &url {
        Some(url) => {
            info!(proxy = %addr, console = console.as_deref().unwrap_or("off"), "offshoot ready; try: psql \"{url}\"")
        }
        None => warn!("no sources configured: every connection will be refused"),
    }
    if !banner {
        return;
    }
    let mut text = format!("offshoot is ready.\n  proxy:    {addr}\n");
    if let Some(console) = &console {
        text.push_str(&format!("  console:  {console}\n"));
    }
    if let Some(path) = token {
        text.push_str(&format!(
            "  admin API token: {} (the console's login and the offshoot CLI read it from there)\n",
            path.display()
        ));
    }
    let Some(url) = url else {
        eprint!("{text}");
        return;
    };
    text.push_str(&format!("Try:\n  psql \"{url}\"\n"));
    if cfg.admin.enabled {
        // The CLI's default admin address is the shipped one.
        let admin = if cfg.admin.listen == crate::config::AdminConfig::default().listen {
            String::new()
        } else {
            format!(" --admin {}", client_addr(cfg.admin.listen))
        };
        text.push_str(&format!("  offshoot branch list{admin}\n"));
        if let Some(first) = cfg.sources.keys().next() {
            text.push_str(&format!("  offshoot branch show {first}.pr-42{admin}\n"));
        }
        let instance = cfg
            .sources
            .iter()
            .find(|(_, s)| s.engine.kind() == crate::config::EngineKind::Instance);
        if let Some((name, _)) = instance {
            text.push_str(&format!("  offshoot snapshot list {name}{admin}\n"));
        }
    }
    eprint!("{text}");
}
