//! The example trainer end to end: a short run on a slice of the embedded digits, its JSON,
//! the checkpoint round trip, and bad input that must fail cleanly without writing anything.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::TempDir;
use torchapprox::torchscript::ScriptModel;

fn trainer() -> PathBuf {
    common::example_bin("train")
}

fn run(args: &[&str]) -> Output {
    Command::new(trainer()).args(args).env_remove("RUST_BACKTRACE").output().unwrap()
}

fn json_of(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "trainer failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim().lines().count(), 1, "--json prints exactly one line on stdout: {stdout}");
    serde_json::from_str(stdout.trim()).unwrap()
}

fn small_data(dir: &Path) -> String {
    let data = dir.join("mnist-small");
    common::embedded_digits().subset(1000, 200).save_dir(&data).unwrap();
    data.to_string_lossy().into_owned()
}

#[test]
fn trains_reports_json_and_round_trips_its_checkpoint() {
    let tmp = TempDir::new("cli");
    let data = small_data(&tmp.0);
    let ckpt = tmp.0.join("lenet.safetensors");
    let ckpt = ckpt.to_str().unwrap();
    let out = run(&[
        "--data",
        &data,
        "--epochs",
        "2",
        "--lr",
        "3e-3",
        "--bits",
        "4",
        "--layer",
        "fc3=minmax,minmax:8",
        "--device",
        "cpu",
        "--json",
        "--save",
        ckpt,
    ]);
    let report = json_of(&out);
    for key in ["model", "mode", "device", "epochs", "final_train_loss", "test_accuracy", "seconds", "layers"]
    {
        assert!(report.get(key).is_some(), "missing {key} in {report}");
    }
    assert_eq!(report["model"], "lenet");
    assert_eq!(report["mode"], "quant");
    assert_eq!(report["device"], "Cpu");
    assert_eq!(report["test_digits"], 200);
    let acc = report["test_accuracy"].as_f64().unwrap();
    assert!((0.6..=1.0).contains(&acc), "two epochs on 1000 digits reached {acc}");
    assert!(report["final_train_loss"].as_f64().unwrap().is_finite());
    let layers = report["layers"].as_array().unwrap();
    let names: Vec<_> = layers.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["conv1", "conv2", "fc1", "fc2", "fc3"]);
    assert_eq!(layers[0]["x_quantizer"]["kind"], "pact");
    assert_eq!(layers[0]["bits"], 4);
    assert!(layers[0]["x_quantizer"]["alpha"].as_f64().unwrap() > 0.0);
    assert!(layers[0]["w_quantizer"]["scale_factor"].as_f64().unwrap() > 0.0);
    assert_eq!(layers[4]["x_quantizer"]["kind"], "minmax");
    assert_eq!(layers[4]["bits"], 8);
    assert!(layers[4]["x_quantizer"]["alpha"].is_null());

    // Evaluate the checkpoint: the same accuracy, to the digit.
    let eval = json_of(&run(&[
        "--data",
        &data,
        "--epochs",
        "0",
        "--bits",
        "4",
        "--layer",
        "fc3=minmax,minmax:8",
        "--json",
        "--load",
        ckpt,
    ]));
    assert_eq!(eval["test_accuracy"], report["test_accuracy"]);
    assert_eq!(eval["layers"][0]["x_quantizer"]["alpha"], report["layers"][0]["x_quantizer"]["alpha"]);
    assert!(eval["final_train_loss"].is_null());
}

/// Runs the trainer expecting failure: non-zero exit, one line on stderr containing `needle`, nothing saved.
fn assert_fails(args: &[&str], needle: &str, save: &Path) {
    let mut all: Vec<&str> = args.to_vec();
    let save_str = save.to_str().unwrap();
    all.extend(["--save", save_str, "--epochs", "1"]);
    let out = run(&all);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(stderr.contains(needle), "{args:?}: stderr {stderr:?} lacks {needle:?}");
    assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: one line on stderr, got {stderr:?}");
    assert!(!save.exists(), "{args:?} wrote {}", save.display());
    assert!(out.stdout.is_empty() || !String::from_utf8_lossy(&out.stdout).contains('{'));
}

#[test]
fn bad_input_fails_with_one_clear_line_and_writes_nothing() {
    let tmp = TempDir::new("cli-bad");
    let data = small_data(&tmp.0);
    let save = tmp.0.join("never.safetensors");
    assert_fails(&["--data", "/nonexistent/mnist"], "MNIST folder /nonexistent/mnist does not exist", &save);
    // --init-from a safetensors file that is not one, or one for another network.
    let junk = tmp.0.join("junk.safetensors");
    std::fs::write(&junk, b"not a state dict").unwrap();
    assert_fails(
        &["--data", &data, "--init-from", junk.to_str().unwrap()],
        "junk.safetensors: not a readable .safetensors file",
        &save,
    );
    let resnet = common::fixture_path("import/resnet_state.safetensors");
    assert_fails(
        &["--data", &data, "--init-from", resnet.to_str().unwrap()],
        "resnet_state.safetensors does not fit the network: missing conv1.bias",
        &save,
    );
    assert_fails(
        &["--data", &data, "--layer", "fc9=pact,minmax"],
        "unknown layer \"fc9\"; lenet has conv1, conv2, fc1, fc2, fc3",
        &save,
    );
    assert_fails(
        &["--data", &data, "--layer", "fc1=pact"],
        "expected NAME=X_KIND[:BITS],W_KIND[:BITS]",
        &save,
    );
    assert_fails(
        &["--data", &data, "--layer", "fc1=pact,dorefa"],
        "unknown quantizer kind \"dorefa\"",
        &save,
    );
    assert_fails(&["--data", &data, "--bits", "40"], "bitwidth 40 is out of range", &save);
    assert_fails(&["--data", &data, "--layer", "fc1=pact,minmax:1"], "bitwidth 1 is out of range", &save);
    if !torchapprox::cuda::is_available() {
        assert_fails(&["--data", &data, "--device", "cuda"], "no CUDA device is available", &save);
    }

    // A checkpoint of another model does not load.
    let mlp = tmp.0.join("mlp.safetensors");
    json_of(&run(&[
        "--data",
        &data,
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--json",
        "--save",
        mlp.to_str().unwrap(),
    ]));
    assert_fails(
        &["--data", &data, "--load", mlp.to_str().unwrap()],
        "does not match the model: missing conv1.bias",
        &save,
    );

    // Corrupt data: a truncated image file and a file that is not IDX at all.
    let bad = tmp.0.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    for f in torchapprox::data::MNIST_FILES {
        std::fs::copy(Path::new(&data).join(f), bad.join(f)).unwrap();
    }
    let img = bad.join("train-images-idx3-ubyte");
    let bytes = std::fs::read(&img).unwrap();
    std::fs::write(&img, &bytes[..bytes.len() - 100]).unwrap();
    assert_fails(&["--data", bad.to_str().unwrap()], "truncated or corrupt", &save);
    std::fs::write(&img, b"hello, not an idx file").unwrap();
    assert_fails(&["--data", bad.to_str().unwrap()], "not an IDX image file", &save);
    std::fs::remove_file(&img).unwrap();
    assert_fails(
        &["--data", bad.to_str().unwrap()],
        "missing train-images-idx3-ubyte (or train-images-idx3-ubyte.gz)",
        &save,
    );
}

fn quantize_cli() -> PathBuf {
    common::example_bin("quantize_torchscript")
}

fn fixture_model(name: &str) -> String {
    common::fixture_path("torchscript").join(format!("{name}.pt")).to_string_lossy().into_owned()
}

#[test]
fn quantize_torchscript_cli_reports_json_writes_atomically_and_refuses_bad_input() {
    let tmp = TempDir::new("qts");
    let model = fixture_model("lenet_traced");
    let out = tmp.0.join("lenet-w4.pt");
    let run_q = |args: &[&str]| {
        Command::new(quantize_cli()).args(args).env_remove("RUST_BACKTRACE").output().unwrap()
    };
    let report = json_of(&run_q(&[
        "--model",
        &model,
        "--bits",
        "4",
        "--per-channel",
        "--layer",
        "fc3=8",
        "--json",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]));
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(common::fixture_path("torchscript/expected.json")).unwrap())
            .unwrap();
    let float = report["float_accuracy"].as_f64().unwrap();
    assert!((float - expected["models"]["lenet_traced"]["float"].as_f64().unwrap()).abs() < 1e-3);
    assert!(report["quantized_accuracy"].as_f64().unwrap() > 0.9);
    assert_eq!(report["bits"], 4);
    assert_eq!(report["per_channel"], true);
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 5);
    assert_eq!(layers[4]["name"], "fc3.weight");
    assert_eq!(layers[4]["bits"], 8);
    assert_eq!(layers[0]["scale_factors"].as_array().unwrap().len(), 6);
    assert!(layers[0]["sqnr_db"].as_f64().unwrap() > 10.0);
    assert!(out.exists());

    // The trainer starts from the exported weights and evaluates them unchanged.
    let eval = json_of(&run(&[
        "--init-from",
        &model,
        "--mode",
        "baseline",
        "--mean",
        "0",
        "--std",
        "1",
        "--epochs",
        "0",
        "--json",
    ]));
    assert!((eval["test_accuracy"].as_f64().unwrap() - float).abs() < 1e-3, "{eval}");
    // The same weights as a safetensors state dict.
    let state = tmp.0.join("lenet_state.safetensors");
    let sd = ScriptModel::load(&model, tch::Device::Cpu).unwrap().state_dict().unwrap();
    tch::Tensor::write_safetensors(&sd, &state).unwrap();
    let args = "--mode baseline --mean 0 --std 1 --epochs 0 --json --init-from";
    let eval = json_of(&run(&[args.split(' ').collect::<Vec<_>>(), vec![state.to_str().unwrap()]].concat()));
    assert!((eval["test_accuracy"].as_f64().unwrap() - float).abs() < 1e-3, "{eval}");

    let before = std::fs::read(&model).unwrap();
    for (args, needle) in [
        (vec!["--model", &model, "--out", &model], "it is the input"),
        (vec!["--model", &model, "--layer", "fc9=4"], "unknown layer(s) fc9"),
        (vec!["--model", &model, "--bits", "1"], "bitwidth 1 is out of range"),
        (vec!["--model", "/nonexistent.pt"], "/nonexistent.pt: no such file"),
        (vec!["--model", &fixture_model("no_weights")], "no quantizable weights"),
    ] {
        let o = run_q(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && stderr.contains(needle), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    }
    assert_eq!(std::fs::read(&model).unwrap(), before, "the input model was modified");
    let e = run(&["--init-from", &fixture_model("bn_dw_cnn"), "--epochs", "0"]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("does not fit the network"));
}
