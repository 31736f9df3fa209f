//! Pretraining as one job of several processes. In process, the ranks are threads talking
//! through `LocalGroup` (the code MPI runs, without MPI): two ranks train as one process with
//! the same data shares does (two devices, or two accumulated micro-batches), rank 0 alone
//! writes the run, and a stopped job resumes exactly, with two ranks or with one process.
//! With the `mpi` feature, the same through `mpiexec -n 2` over loopback: equivalence, resume,
//! a failing rank, ranks started with different options.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use flava_objectives::{LocalGroup, ProcessGroup};
use flava_train::distributed::Group;
use flava_train::observer::Collect;
use flava_train::pretrain::config::PretrainConfig;
use flava_train::pretrain::{self, RunSummary};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flava-distributed-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Tiny preset, batch 8 in 2 data shares, 6 steps, the fixture tokenizer and codebook (both
/// would be trained otherwise, and the tokenizer trainer is not deterministic), no evaluation.
fn config(out: &Path) -> PretrainConfig {
    PretrainConfig {
        preset: "tiny".into(),
        batch_size: 8,
        steps: 6,
        warmup: 2,
        workers: 1,
        checkpoint_every: 3,
        phases: Some("joint".into()),
        codebook: Some(fixtures().join("codebook")),
        tokenizer: Some(fixtures().join("tokenizer").join("tokenizer.json")),
        data_shares: Some(2),
        out: out.to_path_buf(),
        eval: pretrain::config::EvalSection {
            skip: true,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// In-process runs share the device's seeded generator: one run (or one job) at a time.
static ONE_RUN_AT_A_TIME: Mutex<()> = Mutex::new(());

fn alone(cfg: &PretrainConfig) -> anyhow::Result<RunSummary> {
    let _one = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    pretrain::run_with(cfg, &mut Collect::default())
}

/// `n` ranks as threads; each rank's result and messages.
fn job(n: usize, cfg: &PretrainConfig) -> Vec<(anyhow::Result<RunSummary>, Vec<String>)> {
    let _one = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    std::thread::scope(|s| {
        let hs: Vec<_> = LocalGroup::new(n)
            .into_iter()
            .map(|g| {
                let cfg = cfg.clone();
                s.spawn(move || {
                    let group = Group::new(Arc::new(g) as Arc<dyn ProcessGroup>);
                    let mut seen = Collect::default();
                    let r = pretrain::run_in_group(&cfg, &group, &mut seen);
                    (r, seen.messages)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Each step's (step, loss, grad norm, the six losses where present).
fn curve(run: &Path) -> Vec<Vec<f64>> {
    metrics(run)
        .iter()
        .map(|m| {
            let mut v = vec![
                m["step"].as_f64().unwrap(),
                m["loss"].as_f64().unwrap(),
                m["grad_norm"].as_f64().unwrap(),
            ];
            for k in ["mim", "mlm", "itm", "global_contrastive", "mmm_image", "mmm_text"] {
                v.push(m[k].as_f64().unwrap_or(-1.0));
            }
            v
        })
        .collect()
}

/// Every number of `got` within `tol` of `want` (relative to max(1, |want|)), step by step.
fn assert_close(got: &[Vec<f64>], want: &[Vec<f64>], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: steps");
    for (g, w) in got.iter().zip(want) {
        for (a, b) in g.iter().zip(w) {
            assert!(
                (a - b).abs() <= tol * b.abs().max(1.0),
                "{what}, step {}: {a} vs {b}\n got {g:?}\nwant {w:?}",
                w[0]
            );
        }
    }
}

/// Two ranks (one micro-batch each) train as one process building both data shares with two
/// devices, and as one device accumulating two micro-batches: the same losses, gradient norms
/// and terms at every step within float summation order (1e-4). Rank 0 writes the run; the
/// checkpoint holds both ranks' data positions.
#[test]
fn two_ranks_train_as_one_process_with_the_same_data_shares() {
    let dir = scratch("equal");
    let dp = PretrainConfig {
        devices: vec!["flex".into(), "flex".into()],
        ..config(&dir.join("dp"))
    };
    alone(&dp).unwrap();
    let acc = PretrainConfig {
        accumulate: 2,
        ..config(&dir.join("acc"))
    };
    alone(&acc).unwrap();
    let ranks = job(2, &config(&dir.join("ranks")));
    for (r, (res, _)) in ranks.iter().enumerate() {
        let s = res.as_ref().unwrap_or_else(|e| panic!("rank {r}: {e:#}"));
        assert_eq!(s.steps, 6, "rank {r}");
    }
    assert!(
        ranks[0]
            .1
            .iter()
            .any(|m| m.contains("distributed: 2 processes, global batch 8 in 2 data shares")),
        "{:?}",
        ranks[0].1
    );
    let want = curve(&dir.join("dp"));
    assert_eq!(want.len(), 6);
    assert_close(&curve(&dir.join("acc")), &want, 1e-4, "accumulate 2 vs 2 devices");
    assert_close(&curve(&dir.join("ranks")), &want, 1e-4, "2 ranks vs 2 devices");
    // Each step says how long rank 0 spent in collectives.
    for m in metrics(&dir.join("ranks")) {
        assert!(m["samples_per_s"].as_f64().unwrap() > 0.0);
        let (r, g) = (
            m["comm_all_reduce_s"].as_f64().unwrap(),
            m["comm_all_gather_s"].as_f64().unwrap(),
        );
        let step = m["step_time_s"].as_f64().unwrap();
        assert!(r > 0.0 && g > 0.0 && r + g < step, "{m}");
    }
    assert!(metrics(&dir.join("dp"))
        .iter()
        .all(|m| m.get("comm_all_reduce_s").is_none()));
    // The last checkpoint knows where both shares stand.
    let ck = dir
        .join("ranks")
        .join("checkpoints")
        .join("step-00000006")
        .join("state.json");
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ck).unwrap()).unwrap();
    assert_eq!(state["mixer"]["share_count"], 2);
    let shares = state["mixer"]["shares"].as_object().unwrap();
    assert_eq!(shares.keys().collect::<Vec<_>>(), ["0", "1"]);
    // The configuration records the share count, so a resume reads the same data.
    let toml = std::fs::read_to_string(dir.join("ranks").join("config.toml")).unwrap();
    assert!(toml.contains("data_shares = 2"), "{toml}");
    std::fs::remove_dir_all(dir).ok();
}

/// A two-rank job stopped at step 3 and resumed by two ranks ends with the losses of the job
/// that ran through (exactly: the same computation); resumed by one process instead (which
/// then builds both shares), it continues within float summation order (1e-4).
#[test]
fn a_stopped_job_resumes_exactly_with_two_ranks_or_one_process() {
    let dir = scratch("resume");
    let through = config(&dir.join("through"));
    for (r, (res, _)) in job(2, &through).into_iter().enumerate() {
        res.unwrap_or_else(|e| panic!("rank {r}: {e:#}"));
    }
    let want = curve(&dir.join("through"));

    let stopped = PretrainConfig {
        stop_after: Some(3),
        ..config(&dir.join("two"))
    };
    for (res, _) in job(2, &stopped) {
        assert_eq!(res.unwrap().steps, 3);
    }
    let resumed = PretrainConfig {
        resume: true,
        ..config(&dir.join("two"))
    };
    let out = job(2, &resumed);
    for (res, _) in &out {
        assert_eq!(res.as_ref().unwrap().steps, 6);
    }
    assert!(out[0].1.iter().any(|m| m.contains("resumed from")), "{:?}", out[0].1);
    assert_close(&curve(&dir.join("two")), &want, 0.0, "2 ranks, stopped and resumed");

    let stopped = PretrainConfig {
        stop_after: Some(3),
        ..config(&dir.join("one"))
    };
    for (res, _) in job(2, &stopped) {
        res.unwrap();
    }
    // One process continues the two-rank run (the saved configuration keeps 2 data shares).
    alone(&PretrainConfig {
        resume: true,
        ..config(&dir.join("one"))
    })
    .unwrap();
    assert_close(&curve(&dir.join("one")), &want, 1e-4, "2 ranks, resumed by one process");

    // Another share count is refused before anything runs.
    let e = alone(&PretrainConfig {
        resume: true,
        data_shares: Some(4),
        ..config(&dir.join("one"))
    })
    .unwrap_err();
    assert!(format!("{e:#}").contains("data_shares: 2 -> 4"), "{e:#}");
    std::fs::remove_dir_all(dir).ok();
}

/// Shares that do not fit the processes or the batch are refused on every rank, before training.
#[test]
fn data_shares_that_do_not_fit_the_job_are_refused() {
    let dir = scratch("fit");
    let odd = PretrainConfig {
        data_shares: Some(3),
        batch_size: 6,
        ..config(&dir.join("odd"))
    };
    for (r, (res, _)) in job(2, &odd).into_iter().enumerate() {
        let e = res.err().unwrap_or_else(|| panic!("rank {r} ran"));
        assert!(
            format!("{e:#}").contains("cannot be split evenly over 2 processes"),
            "{e:#}"
        );
    }
    let e = alone(&PretrainConfig {
        data_shares: Some(3),
        ..config(&dir.join("div"))
    })
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("--data-shares 3 must divide --batch-size 8"),
        "{e:#}"
    );
    assert!(!dir.join("odd").join("config.toml").exists(), "nothing was written");
    std::fs::remove_dir_all(dir).ok();
}

/// A rank whose data fails stops every rank at the same step with its message (rank 0 keeps
/// the steps done in a checkpoint), instead of leaving the others waiting.
#[test]
fn a_rank_whose_data_fails_stops_the_job_with_its_message() {
    let dir = scratch("bad");
    // One pair: share 0 reads it every epoch, share 1 (rank 1's) has no record at all.
    let tar = dir.join("one.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&tar).unwrap());
    let im = image::RgbImage::from_pixel(16, 16, image::Rgb([20, 100, 200]));
    let mut png = std::io::Cursor::new(Vec::new());
    im.write_to(&mut png, image::ImageFormat::Png).unwrap();
    for (name, bytes) in [("s/000.png", png.into_inner()), ("s/000.txt", b"a caption".to_vec())] {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, &bytes[..]).unwrap();
    }
    b.finish().unwrap();
    drop(b);
    let cfg = PretrainConfig {
        pairs: vec![tar.display().to_string()],
        // Two image-only steps first: the failure comes at step 3, with work to keep.
        phases: Some("images:2,joint".into()),
        ..config(&dir.join("run"))
    };
    let t0 = std::time::Instant::now();
    let out = job(2, &cfg);
    assert!(t0.elapsed().as_secs() < 120, "the job ended promptly");
    for (r, (res, _)) in out.iter().enumerate() {
        let e = res.as_ref().err().unwrap_or_else(|| panic!("rank {r} finished"));
        let e = format!("{e:#}");
        assert!(
            e.contains("rank 1:") && e.contains("too few records for the data shares"),
            "rank {r}: {e}"
        );
        assert!(!e.contains("rank 0:"), "rank 0's data was fine: {e}");
    }
    let kept = dir
        .join("run")
        .join("checkpoints")
        .join("step-00000002")
        .join("state.json");
    assert!(kept.is_file(), "rank 0 saved the two steps done");
    std::fs::remove_dir_all(dir).ok();
}

#[cfg(feature = "mpi")]
mod mpi {
    //! The `flava` binary under `mpiexec -n 2`, every byte on loopback (`-iface lo`).

    use super::*;
    use std::process::{Command, Output};

    fn write_config(cfg: &PretrainConfig, path: &Path) {
        std::fs::write(path, cfg.to_toml()).unwrap();
    }

    /// `mpiexec -n N flava pretrain ARGS` (one thread per rank), with a time limit.
    fn mpiexec(n: usize, args: &[&str]) -> Output {
        mpiexec_with(n, args, &[])
    }

    /// [`mpiexec`] with extra environment variables for every rank.
    fn mpiexec_with(n: usize, args: &[&str], vars: &[(&str, &str)]) -> Output {
        Command::new("timeout")
            .args(["300", "mpiexec", "-iface", "lo", "-n", &n.to_string()])
            .arg(env!("CARGO_BIN_EXE_flava"))
            .arg("pretrain")
            .args(args)
            .env("RAYON_NUM_THREADS", "1")
            .envs(vars.iter().copied())
            .output()
            .expect("mpiexec (Debian: mpich) runs")
    }

    /// stdout and stderr, after checking the job succeeded.
    fn ok(o: &Output) -> String {
        let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
        format!("{out}{err}")
    }

    /// `mpiexec -n 2` trains as one process with two devices and the same shares (1e-4), and a
    /// job stopped after 3 steps resumes under `mpiexec` to the same losses.
    #[test]
    fn mpiexec_two_ranks_train_as_one_process_and_resume() {
        let dir = scratch("mpi");
        let reference = PretrainConfig {
            devices: vec!["flex".into(), "flex".into()],
            ..config(&dir.join("dp"))
        };
        alone(&reference).unwrap();
        let want = curve(&dir.join("dp"));
        let cfg = dir.join("run.toml");
        write_config(&config(&dir.join("mpi")), &cfg);
        let said = ok(&mpiexec(2, &["--config", cfg.to_str().unwrap()]));
        assert!(said.contains("distributed: 2 processes"), "{said}");
        // Rank 0 alone reports (one line each, not two).
        assert_eq!(said.matches("trained 6 steps").count(), 1, "{said}");
        assert_close(&curve(&dir.join("mpi")), &want, 1e-4, "mpiexec -n 2 vs 2 devices");
        assert!(dir.join("mpi").join("model").join("model.safetensors").is_file());

        // The run records the sgemm library all its ranks used. Two fresh runs may each time a
        // different library fastest (`auto`), so the stopped run is told the first run's; its
        // resume, told nothing, must read its own record, or its products change in the last
        // bits and the losses below differ.
        let used = std::fs::read_to_string(dir.join("mpi").join("sgemm.txt")).expect("sgemm.txt");
        write_config(&config(&dir.join("resumed")), &cfg);
        let stop = ["--config", cfg.to_str().unwrap(), "--stop-after", "3"];
        ok(&mpiexec_with(2, &stop, &[("FLAVA_BLAS", used.trim())]));
        assert_eq!(curve(&dir.join("resumed")).len(), 3);
        let out = dir.join("resumed");
        ok(&mpiexec(2, &["--resume", "--out", out.to_str().unwrap()]));
        let recorded = std::fs::read_to_string(out.join("sgemm.txt")).expect("sgemm.txt");
        assert_eq!(recorded, used, "the resume keeps the run's library");
        assert_close(
            &curve(&out),
            &curve(&dir.join("mpi")),
            0.0,
            "stopped and resumed under mpiexec",
        );
        std::fs::remove_dir_all(dir).ok();
    }

    /// Ranks started with different options refuse to train together, and the job ends.
    #[test]
    fn mpiexec_ranks_with_different_options_are_refused() {
        let dir = scratch("mpmd");
        let cfg = dir.join("run.toml");
        write_config(&config(&dir.join("run")), &cfg);
        let bin = env!("CARGO_BIN_EXE_flava");
        let c = cfg.to_str().unwrap();
        let o = Command::new("timeout")
            .args([
                "120", "mpiexec", "-iface", "lo", "-n", "1", bin, "pretrain", "--config", c, "--lr", "0.001",
            ])
            .args([":", "-n", "1", bin, "pretrain", "--config", c, "--lr", "0.002"])
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(e.contains("different configurations") && e.contains("lr"), "{e}");
        assert!(!dir.join("run").join("metrics.jsonl").exists(), "nothing trained");
        std::fs::remove_dir_all(dir).ok();
    }
}

/// A `flava` built without MPI that a launcher started as one of several processes refuses to
/// run (each would train alone into the same run directory).
#[cfg(not(feature = "mpi"))]
#[test]
fn without_mpi_a_process_of_a_launched_job_refuses_to_run() {
    let dir = scratch("nompi");
    for var in ["PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_flava"))
            .args(["pretrain", "--steps", "2", "--out"])
            .arg(dir.join("run"))
            .env(var, "2")
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{var}");
        assert!(
            e.contains("built without MPI") && e.contains("--features mpi"),
            "{var}: {e}"
        );
        assert!(!dir.join("run").exists(), "{var}: nothing written");
    }
    std::fs::remove_dir_all(dir).ok();
}
