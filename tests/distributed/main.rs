//! Several processes on 127.0.0.1 through PyTorch's c10d (Gloo): collectives agree across
//! ranks, and a killed peer, a wrong world size or a wrong port end every rank within the
//! timeout with one line naming the rank and the step, never a hang.
//!
//! The parent tests start this binary's `dist_worker` (ignored when run directly) once per
//! rank, with torchrun's variables set, and kill whatever outlives its limit.

#[path = "../common/mod.rs"]
mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tch::Tensor;
use torchapprox::distributed::{DistEnv, ProcessGroup, ReduceOp};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One finished rank: exit success, stdout, stderr, seconds it ran.
struct Rank {
    ok: bool,
    out: String,
    err: String,
    secs: f64,
}

/// Starts `ranks` workers of `scenario` (with `WORLD_SIZE` = `world`, rank `i`'s port
/// `ports[i]`), and waits at most `limit` for all, killing the rest.
fn run(scenario: &str, world: i64, ports: &[u16], limit: Duration) -> Vec<Rank> {
    let exe = std::env::current_exe().unwrap();
    let start = Instant::now();
    let mut children: Vec<(Child, Option<Rank>)> = ports
        .iter()
        .enumerate()
        .map(|(rank, port)| {
            let child = Command::new(&exe)
                .args(["--ignored", "--exact", "dist_worker", "--nocapture", "--test-threads", "1"])
                .env("TA_DIST_SCENARIO", scenario)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env_remove("RUST_BACKTRACE")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (child, None)
        })
        .collect();
    while children.iter().any(|(_, r)| r.is_none()) {
        for (child, result) in children.iter_mut().filter(|(_, r)| r.is_none()) {
            let status = if start.elapsed() > limit {
                let _ = child.kill();
                Some(child.wait().unwrap())
            } else {
                child.try_wait().unwrap()
            };
            if let Some(status) = status {
                let (mut out, mut err) = (String::new(), String::new());
                child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
                child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                *result = Some(Rank { ok: status.success(), out, err, secs: start.elapsed().as_secs_f64() });
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    children.into_iter().map(|(_, r)| r.unwrap()).collect()
}

/// The worker's error lines (the test harness's own lines left out).
fn error_lines(r: &Rank) -> Vec<&str> {
    r.err.lines().filter(|l| l.starts_with("error: ")).collect()
}

#[test]
#[ignore = "a rank of the multi-process tests, started by them"]
fn dist_worker() {
    let scenario = std::env::var("TA_DIST_SCENARIO").unwrap();
    let env = DistEnv::from_env().unwrap().unwrap();
    // "short": the collectives with a 4 s timeout, for the runs that must fail.
    let timeout = Duration::from_secs(if scenario == "collectives" { 30 } else { 4 });
    let result = (|| -> torchapprox::Result<()> {
        let mut group = ProcessGroup::init(&env, timeout)?;
        let r = env.rank as f32;
        let mut t = Tensor::from_slice(&[r + 1.0, 10.0 * (r + 1.0)]);
        group.allreduce_(&mut t, ReduceOp::Sum)?;
        println!("sum {:?}", Vec::<f32>::try_from(&t).unwrap());
        if scenario == "killed" {
            if env.rank == 1 {
                // A peer that dies mid-epoch, as under the OOM killer.
                std::process::abort();
            }
            for _ in 0..1000 {
                let mut t = Tensor::from_slice(&[1.0f32]);
                group.allreduce_(&mut t, ReduceOp::Sum)?;
                std::thread::sleep(Duration::from_millis(10));
            }
            return Ok(());
        }
        let mut t = Tensor::from_slice(&[r, -r]);
        group.allreduce_(&mut t, ReduceOp::Max)?;
        println!("max {:?}", Vec::<f32>::try_from(&t).unwrap());
        let mut t = Tensor::from_slice(&[r * 7.0; 3]);
        group.broadcast_(&mut t, 1)?;
        println!("broadcast {:?}", Vec::<f32>::try_from(&t).unwrap());
        group.barrier()?;
        group.check_same("the configuration", 0x1234_5678_9abc_def0)?;
        match group.check_same("the parameter shapes", env.rank as u64) {
            Err(e) => println!("disagree: {e}"),
            Ok(()) => println!("disagree: none"),
        }
        Ok(())
    })();
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

#[test]
fn two_ranks_reduce_broadcast_and_refuse_different_configurations() {
    let port = free_port();
    let ranks = run("collectives", 2, &[port, port], Duration::from_secs(60));
    for (i, r) in ranks.iter().enumerate() {
        assert!(r.ok, "rank {i}: {} {}", r.out, r.err);
        assert!(r.out.contains("sum [3.0, 30.0]"), "rank {i}: {}", r.out);
        assert!(r.out.contains("max [1.0, -0.0]"), "rank {i}: {}", r.out);
        assert!(r.out.contains("broadcast [7.0, 7.0, 7.0]"), "rank {i}: {}", r.out);
        assert!(
            r.out.contains(&format!(
                "disagree: rank {i}: start failed: the ranks disagree on the parameter shapes (this rank's is {i:016x})"
            )),
            "rank {i}: {}",
            r.out
        );
    }
}

#[test]
fn a_killed_peer_ends_the_others_within_the_timeout_with_one_line() {
    let port = free_port();
    let ranks = run("killed", 2, &[port, port], Duration::from_secs(60));
    let (survivor, killed) = (&ranks[0], &ranks[1]);
    assert!(!killed.ok, "rank 1 aborts");
    assert!(!survivor.ok, "rank 0 must fail, not finish: {}", survivor.out);
    let lines = error_lines(survivor);
    assert_eq!(lines.len(), 1, "{}", survivor.err);
    assert!(
        lines[0].starts_with("error: rank 0: allreduce failed: a peer is gone or did not answer within 4s"),
        "{}",
        lines[0]
    );
    assert!(survivor.secs < 30.0, "rank 0 took {:.1} s to notice", survivor.secs);
    eprintln!("killed peer noticed by rank 0 after {:.1} s: {}", survivor.secs, lines[0]);
}

#[test]
fn a_wrong_world_size_or_port_is_a_rendezvous_error_not_a_hang() {
    // Three ranks announced, two started.
    let port = free_port();
    let ranks = run("short", 3, &[port, port], Duration::from_secs(60));
    for (i, r) in ranks.iter().enumerate() {
        let lines = error_lines(r);
        assert!(!r.ok && lines.len() == 1, "rank {i}: {} {}", r.out, r.err);
        assert!(
            lines[0].starts_with(&format!(
                "error: rank {i}: rendezvous failed: as rank {i} of 3 at 127.0.0.1:{port}"
            )),
            "{}",
            lines[0]
        );
        assert!(r.secs < 30.0, "rank {i} took {:.1} s", r.secs);
        eprintln!("world size 3 with 2 ranks, rank {i} after {:.1} s: {}", r.secs, lines[0]);
    }
    // Rank 1 looks for the store on another port.
    let (a, b) = (free_port(), free_port());
    let ranks = run("short", 2, &[a, b], Duration::from_secs(60));
    for (i, r) in ranks.iter().enumerate() {
        let lines = error_lines(r);
        assert!(!r.ok && lines.len() == 1, "rank {i}: {} {}", r.out, r.err);
        assert!(lines[0].contains("rendezvous failed"), "{}", lines[0]);
        assert!(r.secs < 30.0, "rank {i} took {:.1} s", r.secs);
        eprintln!("wrong port, rank {i} after {:.1} s: {}", r.secs, lines[0]);
    }
}
