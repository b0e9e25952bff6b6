//! `ums-demo`: the main job of ums, shown on one machine.
//!
//! Two simulated hosts (network namespaces joined by a veth pair, limited to
//! 1 Gbit/s like the UMS testbed's link) each run an outer container whose
//! PID 1 is `ums init`. Outer A runs the `memctr` workload (N MiB of random
//! memory and a counter that ticks every 100 ms) as a nested runc container;
//! outer B is a standby. The demo asks A's `ums` to live-migrate the workload
//! to B, prints the per-phase table, shows that the counter goes on in B where
//! it stopped in A, migrates it back with post-copy (the workload runs at A
//! at once, its memory follows), and prints `ums status` of both.
//!
//!     ums-demo [--mib N] [--rate 1gbit|none] [--verbose]
//!
//! Needs root, the tools of `image/install-deps.sh --test`, and the ums binary
//! (`$UMS_BIN`, default `target/debug/ums`). The output of both outer
//! containers goes to `target/ums-demo.log` (to stderr with `--verbose`).
//! Everything the demo creates is removed when it ends: normally, on an error,
//! on a panic (when built with unwinding, as `make demo` does) and on Ctrl-C.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ums_e2e::{build_workload, parse_tick, Host, ImageBuilder, Outer, Tick};

/// The peer port `ums init` listens on by default.
const PEER_PORT: u16 = 7411;
/// How long the workload may take to touch its memory and start ticking.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the counter may take to show up at the destination.
const CONTINUE_TIMEOUT: Duration = Duration::from_secs(60);
/// The workload's print interval.
const TICK_MS: u64 = 100;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

struct Opts {
    mib: u32,
    rate: Option<String>,
    verbose: bool,
}

const USAGE: &str = "usage: ums-demo [--mib N] [--rate 1gbit|none] [--verbose]
  --mib N        memory the workload touches, in MiB (default 128)
  --rate R       tc rate of the link between the two hosts, or none (default 1gbit)
  --verbose      show the output of both outer containers on stderr
                 (default: written to target/ums-demo.log)
environment: UMS_BIN  the ums binary (default target/debug/ums)";

fn parse_args() -> anyhow::Result<Opts> {
    let mut o = Opts { mib: 128, rate: Some("1gbit".into()), verbose: false };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mib" => {
                let v = args.next().context("--mib needs a value")?;
                o.mib = v.parse().with_context(|| format!("--mib {v:?}: not a number of MiB"))?;
            }
            "--rate" => {
                let v = args.next().context("--rate needs a value (like 1gbit, 100mbit, none)")?;
                o.rate = if v == "none" { None } else { Some(v) };
            }
            "--verbose" | "-v" => o.verbose = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(o)
}

/// Stops the demo's waits on Ctrl-C or SIGTERM, so that the outer containers
/// and hosts are dropped (and removed) instead of left behind.
fn install_interrupt_handlers() -> anyhow::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(SigHandler::Handler(on_interrupt), SaFlags::empty(), SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; no signal mask is changed (a blocked mask would
        // be inherited by the outer containers and the workload).
        unsafe { sigaction(sig, &action) }.with_context(|| format!("install a {sig} handler"))?;
    }
    Ok(())
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Waits for a line containing `pattern` from line `from` on, in short slices
/// so that Ctrl-C ends the wait.
fn wait_line(o: &Outer, from: usize, pattern: &str, timeout: Duration) -> anyhow::Result<(usize, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        let slice = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(250));
        match o.log().wait_for_from(from, pattern, slice) {
            Ok(found) => return Ok(found),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("outer container {}", o.name()));
            }
            Err(e) if e.to_string().contains("output closed") => {
                return Err(e).with_context(|| format!("outer container {} ended", o.name()));
            }
            Err(_) => {}
        }
    }
}

/// Counter lines printed by `o` from line `from` on.
fn ticks(o: &Outer, from: usize) -> Vec<Tick> {
    o.lines()[from..].iter().filter_map(|l| parse_tick(l)).collect()
}

fn step(n: u32, what: &str) -> Instant {
    println!("\n[{n}] {what}");
    Instant::now()
}

fn done(t: Instant) {
    println!("    done in {:.2} s", t.elapsed().as_secs_f64());
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

/// Migrate the workload from `src` to `dst` (reached at `dst_addr`), print the
/// table `ums migrate` prints, and show that the counter goes on in `dst`
/// exactly where it stopped in `src`.
fn migrate(src: &Outer, dst: &Outer, dst_addr: std::net::Ipv4Addr, mode: &str) -> anyhow::Result<()> {
    check_interrupted()?;
    let from_src = src.log().len();
    let from_dst = dst.log().len();
    let to = format!("{dst_addr}:{PEER_PORT}");
    println!("    {}$ ums migrate --mode {mode} --to {to}", src.name());
    let t = Instant::now();
    let table = src.ums_ok(&["migrate", "--mode", mode, "--to", &to])?;
    let took = t.elapsed();
    print!("{}", indent(&table));
    println!("    (the client waited {:.2} s)", took.as_secs_f64());

    // The source's last tick before the freeze; the pipe may still be
    // delivering it, so read it once the destination is ticking.
    let (_, first_line) =
        wait_line(dst, from_dst, "tick ", CONTINUE_TIMEOUT).context("the counter did not go on at the destination")?;
    let first = parse_tick(&first_line).context("unreadable tick line")?;
    wait_line(dst, from_dst, &format!("tick {} ", first.n + 2), CONTINUE_TIMEOUT)?;
    let last = ticks(src, 0).last().copied().context("the source printed no tick")?;
    let after = ticks(dst, from_dst);
    let shown: Vec<String> = after.iter().take(3).map(|t| t.n.to_string()).collect();
    println!("    last tick in {}:   {} (at {} ms)", src.name(), last.n, last.unix_ms);
    println!("    first ticks in {}: {} (first at {} ms)", dst.name(), shown.join(", "), first.unix_ms);
    let gap = first.unix_ms.saturating_sub(last.unix_ms);
    println!(
        "    counter gap: {gap} ms between the two lines, so the workload missed about {} ms of work",
        gap.saturating_sub(TICK_MS)
    );
    if first.n != last.n + 1 {
        bail!(
            "the counter did not continue: {} ended at {}, {} went on at {}",
            src.name(),
            last.n,
            dst.name(),
            first.n
        );
    }
    for w in after.windows(2) {
        if w[1].n != w[0].n + 1 {
            bail!("ticks at {} are not consecutive: {} then {}", dst.name(), w[0].n, w[1].n);
        }
    }
    let late = ticks(src, from_src).into_iter().filter(|t| t.n > last.n).count();
    if late > 0 {
        bail!("{} still printed ticks after the migration", src.name());
    }
    println!("    the counter went on at {} with no gap, no repeat and no restart", dst.name());
    Ok(())
}

/// CRIU's lazy dump needs pipes of 4 MiB (post-copy's pre-migration check
/// says so otherwise); raise the host's limit if it is lower.
fn lazy_pages_host() -> anyhow::Result<()> {
    let p = "/proc/sys/fs/pipe-max-size";
    let cur: u64 = std::fs::read_to_string(p).context(p)?.trim().parse().context(p)?;
    if cur < 4 << 20 {
        std::fs::write(p, (4u64 << 20).to_string()).with_context(|| format!("raise {p} to 4 MiB"))?;
        println!("    raised fs.pipe-max-size from {cur} to {} for CRIU's lazy dump", 4u64 << 20);
    }
    Ok(())
}

fn run(o: &Opts) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("ums-demo must run as root (it creates network namespaces and outer containers)");
    }
    let ums = ums_e2e::ums_bin()?;
    let link = o.rate.as_deref().unwrap_or("unlimited");
    println!("ums demo: live migration of a {} MiB workload between two outer containers", o.mib);
    println!("  ums binary: {}", ums.display());
    println!("  link:       veth pair between two network namespaces, {link}");

    // Declared first, dropped last: the scratch dir outlives the containers.
    let tmp = tempfile::Builder::new().prefix("ums-demo-").tempdir().context("create a scratch dir")?;

    let t = step(1, "build the memctr workload and its OCI image layout");
    let memctr = build_workload(tmp.path());
    let mib = o.mib.to_string();
    let image = ImageBuilder::new(&memctr)
        .cmd(&[&mib])
        .build(&tmp.path().join("layout"))
        .context("build the OCI image layout")?;
    println!("    image {} (busybox + /bin/memctr, Cmd [\"{mib}\"])", image.manifest_digest);
    done(t);

    let t = step(2, "create two hosts joined by a veth pair");
    check_interrupted()?;
    let (ha, hb) = Host::pair("demo", o.rate.as_deref())?;
    println!("    host a: {} ({})", ha.addr(), ha.name());
    println!("    host b: {} ({})", hb.addr(), hb.name());
    done(t);

    // Dropped before the hosts: their network namespaces go last.
    let t = step(3, "start outer container A (ums init, the workload) and B (ums init --standby)");
    check_interrupted()?;
    let a = Outer::builder("demo-a").host(&ha).layout(&image.layout).ums(&ums).start()?;
    let b = Outer::builder("demo-b").host(&hb).layout(&image.layout).ums(&ums).args(&["--standby"]).start()?;
    wait_line(&b, 0, "standby", START_TIMEOUT).context("B did not reach standby")?;
    println!("    waiting for the workload in A to touch {} MiB and tick", o.mib);
    wait_line(&a, 0, "tick 10 ", START_TIMEOUT).context("the workload in A did not start ticking")?;
    print!("{}", indent(&a.ums_ok(&["status"])?));
    done(t);

    let t = step(4, "live-migrate the workload A -> B (stop-copy: frozen while its memory moves)");
    migrate(&a, &b, hb.addr(), "stop-copy")?;
    done(t);

    let t = step(5, "let it run in B for a second, then migrate it back B -> A (post-copy: it runs at A at once, its memory follows)");
    lazy_pages_host()?;
    let from = b.log().len();
    wait_line(&b, from, "tick ", CONTINUE_TIMEOUT)?;
    std::thread::sleep(Duration::from_millis(1000));
    migrate(&b, &a, ha.addr(), "post-copy")?;
    done(t);

    step(6, "ums status of both");
    println!("    --- A ---");
    print!("{}", indent(&a.ums_ok(&["status"])?));
    println!("    --- B ---");
    print!("{}", indent(&b.ums_ok(&["status"])?));

    println!("\ncleaning up: stopping both outer containers, removing the hosts");
    drop(a);
    drop(b);
    drop((ha, hb));
    drop(tmp);
    Ok(())
}

/// Where the outer containers' output goes unless --verbose.
fn log_path() -> PathBuf {
    ums_e2e::target_dir().join("ums-demo.log")
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ums-demo: {e:#}");
            std::process::exit(2);
        }
    };
    // The outer containers' lines are echoed to stderr by ums_e2e; keep them
    // in a log file so that stdout tells the story (errors included).
    if !opts.verbose {
        let path = log_path();
        let _ = std::fs::create_dir_all(path.parent().unwrap_or(&PathBuf::from(".")));
        match File::create(&path) {
            Ok(f) => {
                if nix::unistd::dup2(f.as_raw_fd(), 2).is_ok() {
                    println!("(output of the outer containers: {})", path.display());
                }
            }
            Err(e) => eprintln!("ums-demo: cannot create {}: {e}; output goes to stderr", path.display()),
        }
    }
    std::panic::set_hook({
        let default = std::panic::take_hook();
        Box::new(move |info| {
            println!("ums-demo: panic: {info}");
            default(info);
        })
    });
    if let Err(e) = install_interrupt_handlers() {
        eprintln!("ums-demo: {e:#}");
    }
    let result = run(&opts);
    let _ = std::io::stdout().flush();
    match result {
        Ok(()) => println!("demo finished"),
        Err(e) => {
            // Everything the demo made is gone by now: run() dropped it.
            if INTERRUPTED.load(Ordering::SeqCst) {
                println!("\nums-demo: interrupted; everything it created was removed");
            } else {
                println!("\nums-demo failed: {e:#}");
            }
            if !opts.verbose {
                println!("(the outer containers' output is in {})", log_path().display());
            }
            std::process::exit(1);
        }
    }
}
