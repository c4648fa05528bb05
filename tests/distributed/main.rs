//! Several processes on 127.0.0.1 through PyTorch's c10d (Gloo): collectives agree across
//! ranks, and a killed peer, a wrong world size or a wrong port end every rank within the
//! timeout with one line naming the rank and the step, never a hang.
//!
//! The parent tests start this binary's `dist_worker` (ignored when run directly) once per
//! rank, with torchrun's variables set, and kill whatever outlives its limit.

#[path = "../common/mod.rs"]
mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tch::Tensor;
use torchapprox::distributed::{CudaBackend, DataParallel, DistEnv, ProcessGroup, ReduceOp};

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
                .env("LOCAL_RANK", rank.to_string())
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
    if let Some(backend) = scenario.strip_prefix("grads-") {
        if let Err(e) = gradient_worker(&env, backend.parse().unwrap()) {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        return;
    }
    // "short": the collectives with a 4 s timeout, for the runs that must fail.
    let timeout = Duration::from_secs(if scenario == "collectives" { 30 } else { 4 });
    let result = (|| -> torchapprox::Result<()> {
        let mut group = ProcessGroup::init(&env, timeout)?;
        let r = env.rank as f32;
        let mut t = Tensor::from_slice(&[r + 1.0, 10.0 * (r + 1.0)]);
        group.allreduce_(&mut t, ReduceOp::Sum)?;
        println!("sum {:?}", Vec::<f32>::try_from(&t).unwrap());
        // "killed": rank 1 dies; "killed-host": rank 0, which hosts the store, dies.
        let victim = match scenario.as_str() {
            "killed" => Some(1),
            "killed-host" => Some(0),
            _ => None,
        };
        if let Some(victim) = victim {
            if env.rank == victim {
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
        // Bad arguments to the data-parallel backward pass are refused before any collective.
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let w = vs.root().var("w", &[2], tch::nn::Init::Const(1.0));
        let mut dp = torchapprox::distributed::DataParallel::new(group, 1 << 20);
        let loss = (&w * 2.0).sum(tch::Kind::Float);
        for (what, l, local) in [("vector", &w * 2.0, 1), ("empty share", loss, 0)] {
            match dp.backward(&vs, &l, local, 4) {
                Err(e) => println!("refused {what}: {e}"),
                Ok(()) => println!("refused {what}: no"),
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// A rank of `backend`: collectives on its device (its GPU for NCCL, the CPU for Gloo), CPU
/// tensors through Gloo either way, and the data-parallel backward pass (c10d's Reducer, then
/// the after-pass sums) on that device's gradients.
fn gradient_worker(env: &DistEnv, backend: CudaBackend) -> torchapprox::Result<()> {
    let device = match backend {
        CudaBackend::Nccl => tch::Device::Cuda(env.local_rank as usize),
        CudaBackend::Gloo => tch::Device::Cpu,
    };
    let group = ProcessGroup::init_with(env, Duration::from_secs(60), backend)?;
    let r = env.rank as f32;
    let mut dp = DataParallel::new(group, 1 << 20);
    let mut t = Tensor::from_slice(&[r + 1.0, 10.0 * (r + 1.0)]).to_device(device);
    dp.group().allreduce_(&mut t, ReduceOp::Sum)?;
    println!("sum {:?} on {:?}", Vec::<f32>::try_from(&t.to_device(tch::Device::Cpu)).unwrap(), t.device());
    let mut c = Tensor::from_slice(&[r + 1.0]);
    dp.group().allreduce_(&mut c, ReduceOp::Max)?;
    println!("cpu max {:?}", Vec::<f32>::try_from(&c).unwrap());
    // Each rank's one sample x_r = (r + 1) [1, 2, 3]: the global batch's gradient of the mean
    // of w . x over the samples is their mean, overlapped or summed after the pass.
    let vs = tch::nn::VarStore::new(device);
    let mut w = vs.root().var("w", &[3], tch::nn::Init::Const(1.0));
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).to_device(device) * f64::from(r + 1.0);
    for overlap in [true, false] {
        dp.set_overlap(overlap);
        w.zero_grad();
        let loss = (&w * &x).sum(tch::Kind::Float);
        dp.backward(&vs, &loss, 1, env.world_size)?;
        println!(
            "grad overlap={overlap} {:?}",
            Vec::<f32>::try_from(&w.grad().to_device(tch::Device::Cpu)).unwrap()
        );
    }
    Ok(())
}

/// Checks the lines of `gradient_worker` on `world` ranks of `backend`.
fn check_gradient_ranks(backend: &str, world: i64) {
    let port = free_port();
    let ranks =
        run(&format!("grads-{backend}"), world, &vec![port; world as usize], Duration::from_secs(120));
    let n = world as f32;
    let (sum, mean) = (n * (n + 1.0) / 2.0, (n + 1.0) / 2.0);
    for (i, r) in ranks.iter().enumerate() {
        assert!(r.ok, "rank {i}: {} {}", r.out, r.err);
        let on = if backend == "nccl" { format!("Cuda({i})") } else { "Cpu".into() };
        let lines = [
            format!("sum {:?} on {on}", [sum, 10.0 * sum]),
            format!("cpu max {:?}", [n]),
            format!("grad overlap=true {:?}", [mean, 2.0 * mean, 3.0 * mean]),
            format!("grad overlap=false {:?}", [mean, 2.0 * mean, 3.0 * mean]),
        ];
        for line in lines {
            assert!(r.out.contains(&line), "rank {i}: {line:?} not in {}", r.out);
        }
    }
}

/// The gradient worker's checks on one and two Gloo ranks: what the NCCL run below must
/// print too (a machine with one GPU runs one NCCL rank).
#[test]
fn gloo_ranks_average_gradients_overlapped_or_after_the_pass() {
    check_gradient_ranks("gloo", 1);
    check_gradient_ranks("gloo", 2);
}

/// c10d's NCCL group, where this build has it and libtorch sees a GPU: one rank per GPU (two
/// where there are two), run by scripts/checks/gpu-check.sh.
#[test]
fn nccl_groups_reduce_cuda_tensors_and_gradients() {
    if !torchapprox::distributed::NCCL_BUILT || !torchapprox::cuda::is_available() {
        eprintln!("SKIPPED on this machine (no nccl feature or no CUDA device): NCCL collectives");
        return;
    }
    check_gradient_ranks("nccl", tch::Cuda::device_count().min(2));
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
        for line in ["refused vector: elements of the loss", "refused empty share: samples of a rank's share"]
        {
            assert!(r.out.contains(line), "rank {i}: {}", r.out);
        }
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
        lines[0].starts_with(
            "error: rank 0: allreduce failed: a peer is gone or did not answer within 4s: \
             rank 1 is lost (its heartbeat stopped); "
        ),
        "{}",
        lines[0]
    );
    assert!(survivor.secs < 30.0, "rank 0 took {:.1} s to notice", survivor.secs);
    eprintln!("killed peer noticed by rank 0 after {:.1} s: {}", survivor.secs, lines[0]);
    // The rank hosting the store dies: the survivor names the store's host.
    let port = free_port();
    let ranks = run("killed-host", 2, &[port, port], Duration::from_secs(60));
    let (killed, survivor) = (&ranks[0], &ranks[1]);
    assert!(!killed.ok && !survivor.ok, "{}", survivor.out);
    let lines = error_lines(survivor);
    assert_eq!(lines.len(), 1, "{}", survivor.err);
    let host = format!(
        "the store at 127.0.0.1:{port} does not answer: its host is lost (rank 0, or torchrun's agent); "
    );
    assert!(
        lines[0].starts_with("error: rank 1: allreduce failed: a peer is gone") && lines[0].contains(&host),
        "{}",
        lines[0]
    );
    assert!(survivor.secs < 30.0, "rank 1 took {:.1} s to notice", survivor.secs);
    eprintln!("killed store host noticed by rank 1 after {:.1} s: {}", survivor.secs, lines[0]);
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

/// Starts `train` with `args` as rank `rank` of `world` (no rank: a single process).
fn train(rank: Option<(i64, i64, u16)>, args: &[&str]) -> Child {
    program("train", rank, args)
}

/// Starts the example `name` with `args` as rank `rank` of `world` (no rank: a single process).
fn program(name: &str, rank: Option<(i64, i64, u16)>, args: &[&str]) -> Child {
    let mut c = Command::new(common::example_bin(name));
    c.args(args).env_remove("RUST_BACKTRACE").stdout(Stdio::piped()).stderr(Stdio::piped());
    for v in ["RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"] {
        c.env_remove(v);
    }
    if let Some((rank, world, port)) = rank {
        c.env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
    }
    c.spawn().unwrap()
}

fn finish(mut c: Child, limit: Duration) -> (bool, String, String, f64) {
    let start = Instant::now();
    let status = loop {
        if let Some(s) = c.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = c.kill();
            break c.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (mut out, mut err) = (String::new(), String::new());
    c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (status.success(), out, err, start.elapsed().as_secs_f64())
}

#[test]
fn two_ranks_train_as_one_process_on_the_whole_batch() {
    let tmp = common::TempDir::new("dp-equal");
    let data = tmp.0.join("digits");
    torchapprox::data::Mnist::embedded().unwrap().subset(256, 200).save_dir(&data).unwrap();
    // PACT activations with SGD and Adam; MinMax activations with running ranges (each
    // training batch's range synchronised over the ranks) with Adam; LSQ activations and
    // weights (learned step sizes, the weights' set from rank 0's weights) with Adam. The
    // gradients are summed during the backward pass (c10d's Reducer), and once after it.
    for (optimizer, x_quant, w_quant, overlap) in [
        ("sgd", "pact", "minmax", true),
        ("adam", "pact", "minmax", true),
        ("adam", "pact", "minmax", false),
        ("adam", "minmax", "minmax", true),
        ("adam", "lsq", "lsq", true),
    ] {
        let what = format!("{optimizer} {x_quant} {w_quant}{}", if overlap { "" } else { " --no-overlap" });
        let (one, two) = (
            tmp.0.join(format!("one-{optimizer}-{x_quant}-{overlap}.safetensors")),
            tmp.0.join(format!("two-{optimizer}-{x_quant}-{overlap}.safetensors")),
        );
        let args = |save: &Path| -> Vec<String> {
            [
                "--model",
                "lenet",
                "--epochs",
                "1",
                "--batch-size",
                "64",
                "--threads",
                "1",
                "--x-quant",
                x_quant,
                "--w-quant",
                w_quant,
                "--mode",
                "quantized",
                "--optimizer",
                optimizer,
                "--json",
                "--data",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain([data.display().to_string(), "--save".into(), save.display().to_string()])
            .collect()
        };
        let a1 = args(&one);
        let (ok, _, err, _) =
            finish(train(None, &a1.iter().map(|s| s.as_str()).collect::<Vec<_>>()), Duration::from_secs(120));
        assert!(ok, "{err}");
        let mut a2 = args(&two);
        if !overlap {
            a2.push("--no-overlap".into());
        }
        let a2: Vec<&str> = a2.iter().map(|s| s.as_str()).collect();
        let port = free_port();
        let r0 = train(Some((0, 2, port)), &a2);
        let r1 = train(Some((1, 2, port)), &a2);
        let (ok0, out0, err0, _) = finish(r0, Duration::from_secs(120));
        let (ok1, out1, err1, _) = finish(r1, Duration::from_secs(120));
        assert!(ok0 && ok1, "{err0}\n{err1}");
        // Rank 0 alone reports and writes; rank 1 stays quiet.
        let report: serde_json::Value = serde_json::from_str(out0.trim()).unwrap();
        assert_eq!(report["processes"], 2, "{report}");
        // Overlapped, c10d's Reducer sums during the pass: no sums are left for after it
        // (but LSQ's activation step sizes, whose correction differs per rank).
        assert_eq!(report["overlap"], overlap, "{report}");
        let after = report["gradient_sum_seconds"].as_f64().unwrap();
        assert_eq!(after > 0.0, !overlap || x_quant == "lsq", "{what}: {after} s of sums after the pass");
        assert!(out1.trim().is_empty(), "rank 1 printed {out1}");
        // 256 digits, global batch 64: four steps. The same weights and alphas as one
        // process, within float summation order (two half-batch means vs one mean).
        let read = |p: &Path| {
            let mut v = Tensor::read_safetensors(p).unwrap();
            v.sort_by(|x, y| x.0.cmp(&y.0));
            v
        };
        let (a, b) = (read(&one), read(&two));
        assert_eq!(a.len(), b.len());
        let mut worst = 0.0f64;
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            worst = worst.max((ta - tb).abs().max().double_value(&[]));
        }
        eprintln!("{what}: largest difference between 2 ranks and 1 process after 4 steps: {worst:.3e}");
        assert!(worst < 1e-5, "{what}: 2 ranks differ from 1 process by {worst}");
    }
}

/// `quantize_torchscript --finetune-epochs` under two ranks fine-tunes as one process on the
/// whole batch: the rewritten model (PACT inputs, alphas and weights trained) and the
/// weight-only QAT, both written by rank 0 alone.
#[test]
fn two_ranks_finetune_a_torchscript_model_as_one_process() {
    let tmp = common::TempDir::new("dp-ts");
    let model = common::fixture_path("torchscript/mlp_scripted.pt");
    for x_quant in ["pact", "none"] {
        let out = |who: &str| tmp.0.join(format!("{who}-{x_quant}.pt"));
        let args = |o: &Path| -> Vec<String> {
            let mut a: Vec<String> =
                ["--x-quant", x_quant, "--bits", "4", "--finetune-epochs", "1", "--finetune-lr", "1e-3"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
            a.extend(["--limit", "256", "--threads", "1", "--json", "--model"].map(String::from));
            a.extend([model.display().to_string(), "--out".into(), o.display().to_string()]);
            a
        };
        let run_with = |rank: Option<(i64, i64, u16)>, o: &Path| {
            let a = args(o);
            program("quantize_torchscript", rank, &a.iter().map(|s| s.as_str()).collect::<Vec<_>>())
        };
        let (ok, _, err, _) = finish(run_with(None, &out("one")), Duration::from_secs(120));
        assert!(ok, "{err}");
        let port = free_port();
        let (r0, r1) = (run_with(Some((0, 2, port)), &out("two")), run_with(Some((1, 2, port)), &out("two")));
        let ((ok0, out0, err0, _), (ok1, out1, err1, _)) =
            (finish(r0, Duration::from_secs(120)), finish(r1, Duration::from_secs(120)));
        assert!(ok0 && ok1, "{err0}\n{err1}");
        let report: serde_json::Value = serde_json::from_str(out0.trim()).unwrap();
        assert_eq!(report["processes"], 2, "{report}");
        assert!(out1.trim().is_empty() && err1.trim().is_empty(), "rank 1 spoke: {out1} {err1}");
        let read = |p: &Path| {
            torchapprox::torchscript::ScriptModel::load(p, tch::Device::Cpu).unwrap().state_dict().unwrap()
        };
        let (a, b) = (read(&out("one")), read(&out("two")));
        assert_eq!(a.len(), b.len());
        let mut worst = 0.0f64;
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            if ta.is_floating_point() && ta.numel() > 0 {
                worst = worst.max((ta - tb).abs().max().double_value(&[]));
            }
        }
        eprintln!(
            "quantize_torchscript --x-quant {x_quant}: 2 ranks vs 1 process after 4 steps: {worst:.3e}"
        );
        // Weight-only QAT ends in 4-bit weights: a float difference at a rounding edge could
        // move one weight by a step; the rewritten model keeps float weights.
        assert!(worst < 1e-5, "--x-quant {x_quant}: 2 ranks differ from 1 process by {worst}");
    }
}

/// `custom_net` (a residual CNN with BatchNorm built with `approx_sequential`) under two
/// ranks: float training, calibration and QAT on shares of each global batch. BatchNorm
/// normalises each rank's share with its own statistics, so the run is not one process's
/// bit for bit; its accuracy is, within a few points, and rank 0 alone writes.
#[test]
fn two_ranks_train_the_custom_network() {
    let tmp = common::TempDir::new("dp-custom");
    let args = |out: &Path| -> Vec<String> {
        [
            "--train-digits",
            "1024",
            "--epochs",
            "1",
            "--qat-epochs",
            "1",
            "--threads",
            "1",
            "--device",
            "cpu",
            "--json",
            "--out",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([out.display().to_string()])
        .collect()
    };
    let start = |rank, out: &Path| {
        let a = args(out);
        program("custom_net", rank, &a.iter().map(|s| s.as_str()).collect::<Vec<_>>())
    };
    let (one, two) = (tmp.0.join("one.safetensors"), tmp.0.join("two.safetensors"));
    let (ok, out, err, _) = finish(start(None, &one), Duration::from_secs(300));
    assert!(ok, "{err}");
    let single: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let port = free_port();
    let (r0, r1) = (start(Some((0, 2, port)), &two), start(Some((1, 2, port)), &two));
    let ((ok0, out0, err0, _), (ok1, out1, err1, _)) =
        (finish(r0, Duration::from_secs(300)), finish(r1, Duration::from_secs(300)));
    assert!(ok0 && ok1, "{err0}\n{err1}");
    assert!(out1.trim().is_empty(), "rank 1 printed {out1}");
    let report: serde_json::Value = serde_json::from_str(out0.trim()).unwrap();
    assert_eq!(report["processes"], 2, "{report}");
    let (a1, a2) = (single["accuracy"].as_f64().unwrap(), report["accuracy"].as_f64().unwrap());
    eprintln!("custom_net on 1024 digits: 1 process {a1:.2}%, 2 ranks {a2:.2}%");
    assert!(a2 > 70.0 && (a1 - a2).abs() < 5.0, "2 ranks {a2}% vs 1 process {a1}%");
    assert!(two.exists() && report["reload_max_diff"] == 0.0, "{report}");
}

#[test]
fn a_rank_killed_mid_training_ends_the_other_without_a_checkpoint() {
    let tmp = common::TempDir::new("dp-killed");
    let data = tmp.0.join("digits");
    torchapprox::data::Mnist::embedded().unwrap().subset(2048, 200).save_dir(&data).unwrap();
    let save = tmp.0.join("never.safetensors");
    let args = [
        "--model",
        "lenet",
        "--epochs",
        "200",
        "--threads",
        "1",
        "--dist-timeout",
        "5",
        "--data",
        data.to_str().unwrap(),
        "--save",
        save.to_str().unwrap(),
    ];
    let port = free_port();
    let r0 = train(Some((0, 2, port)), &args);
    let mut r1 = train(Some((1, 2, port)), &args);
    std::thread::sleep(Duration::from_secs(3));
    r1.kill().unwrap();
    let killed_at = Instant::now();
    let _ = r1.wait();
    let (ok, _, err, _) = finish(r0, Duration::from_secs(60));
    let secs = killed_at.elapsed().as_secs_f64();
    assert!(!ok, "rank 0 must fail: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("error: rank 0: ")
            && lines[0].contains("failed: a peer is gone")
            && lines[0].contains("rank 1 is lost (its heartbeat stopped)"),
        "{}",
        lines[0]
    );
    assert!(secs < 20.0, "rank 0 took {secs:.1} s after the kill");
    assert!(!save.exists(), "no checkpoint from a broken run");
    eprintln!("rank 1 killed mid-training: rank 0 exited {secs:.1} s later: {}", lines[0]);
}

#[test]
fn torchrun_starts_the_trainer_as_it_is() {
    let tmp = common::TempDir::new("dp-torchrun");
    let data = tmp.0.join("digits");
    torchapprox::data::Mnist::embedded().unwrap().subset(256, 200).save_dir(&data).unwrap();
    let torchrun = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/torchrun");
    let master_port = free_port().to_string();
    let mut c = Command::new(torchrun);
    c.args(["--no-python", "--nproc-per-node", "2", "--master-port", &master_port])
        .arg(common::example_bin("train"))
        // 256 digits in batches of 85: the last batch, of 1 digit, is skipped by both ranks.
        .args([
            "--model",
            "lenet",
            "--epochs",
            "1",
            "--threads",
            "1",
            "--batch-size",
            "85",
            "--json",
            "--data",
        ])
        .arg(&data)
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (ok, out, err, secs) = finish(c.spawn().unwrap(), Duration::from_secs(120));
    assert!(ok, "{err}");
    // Rank 0's one JSON object; rank 1 prints nothing.
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["processes"], 2, "{report}");
    eprintln!("torchrun, 2 ranks: {secs:.1} s, test accuracy {}", report["test_accuracy"]);
}

#[test]
fn the_trainers_distributed_flags_refuse_bad_values_with_one_line() {
    for (args, needle) in [
        (&["--dist-timeout", "0"][..], "--dist-timeout must be more than 0 and at most 600 seconds, got 0"),
        (
            &["--dist-timeout", "1e9"][..],
            "--dist-timeout must be more than 0 and at most 600 seconds, got 1000000000",
        ),
        (
            &["--dist-timeout", "NaN"][..],
            "--dist-timeout must be more than 0 and at most 600 seconds, got NaN",
        ),
        (&["--bucket-mb", "0"][..], "--bucket-mb must be from 1 to 4096, got 0"),
    ] {
        let (ok, _, err, _) =
            finish(train(None, &[&["--epochs", "0"][..], args].concat()), Duration::from_secs(60));
        assert!(!ok && err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    // Bad torchrun variables: one line naming the variable, before anything starts.
    let mut c = Command::new(common::example_bin("train"));
    c.args(["--epochs", "0"])
        .env("WORLD_SIZE", "2")
        .env("RANK", "x")
        .env("MASTER_PORT", "1")
        .env_remove("RUST_BACKTRACE");
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.trim() == "error: RANK=\"x\": is not a whole number", "{err}");
    // An unknown backend: clap's own refusal, naming the value and the ones it takes.
    let (ok, _, err, _) =
        finish(train(None, &["--epochs", "0", "--dist-backend", "mpi"]), Duration::from_secs(60));
    assert!(!ok && err.starts_with("error: invalid value 'mpi' for '--dist-backend"), "{err}");
    assert!(err.contains("[possible values: auto, gloo, nccl]") && !err.contains("panicked"), "{err}");
    // NCCL where this build or machine lacks it: refused before the rendezvous (no peer
    // needed), with one line.
    let needle = if torchapprox::distributed::NCCL_BUILT && !torchapprox::cuda::is_available() {
        "rank 0: rendezvous failed: NCCL carries CUDA tensors, and libtorch sees no CUDA device here"
    } else {
        "rank 0: rendezvous failed: NCCL is not in this build of torchapprox: build it with the `nccl` feature"
    };
    if !torchapprox::cuda::is_available() {
        let (ok, _, err, _) = finish(
            train(Some((0, 2, free_port())), &["--epochs", "0", "--dist-backend", "nccl"]),
            Duration::from_secs(60),
        );
        assert!(!ok && err.contains(needle), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    // custom_net's global batch must give each of the ranks two digits (BatchNorm needs two).
    let port = free_port();
    let args = ["--batch-size", "3", "--epochs", "0", "--qat-epochs", "0", "--train-digits", "64"];
    let (r0, r1) =
        (program("custom_net", Some((0, 2, port)), &args), program("custom_net", Some((1, 2, port)), &args));
    for (i, r) in [r0, r1].into_iter().enumerate() {
        let (ok, _, err, _) = finish(r, Duration::from_secs(60));
        assert!(!ok && err.trim().lines().count() == 1, "rank {i}: {err}");
        assert!(
            err.contains("--batch-size is the global batch: with 2 ranks it must be at least 4, got 3"),
            "rank {i}: {err}"
        );
    }
}
