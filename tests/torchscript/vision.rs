//! Real architectures through the TorchScript rewrite (scripts/checks/vision_models.py):
//! torchvision's resnet18, mobilenet_v2, mobilenet_v3_small and a small ViT, and a network of
//! every convolution geometry, scripted and traced. Every Conv2d, Linear and attention
//! projection is rewritten or reported, the alphas train, and PyTorch agrees twice:
//! reloading the file gives Rust's logits, and an eager reference computing
//! `op(q_x, q_w) / (s_x s_w) + b` per projection (the attention between them in float)
//! matches them.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::{assert_close, TempDir};
use tch::{Device, Tensor};
use torchapprox::approx::Multiplier;
use torchapprox::torchscript::{LayerOp, RewriteConfig, ScriptModel, TracedAttention};

/// Runs the models script with `args`, panicking with what it printed unless it succeeds.
fn models_script(args: &[&std::ffi::OsStr]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/checks/vision_models.py");
    let o = Command::new(common::python()).arg(script).args(args).output().unwrap();
    let said = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "vision_models.py {args:?}: {said} {}", String::from_utf8_lossy(&o.stderr));
    said
}

#[test]
fn torchvision_models_are_rewritten_reported_and_agree_with_pytorch() {
    let tmp = TempDir::new("vision");
    models_script(&["build".as_ref(), tmp.0.as_os_str()]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.0.join("models.json")).unwrap()).unwrap();
    let mut checked = 0;
    for entry in index.as_array().unwrap() {
        let name = entry["name"].as_str().unwrap();
        let layers: Vec<&str> =
            entry["layers"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
        let x = Tensor::read_safetensors(tmp.0.join(format!("{name}-x.safetensors"))).unwrap()[0]
            .1
            .shallow_clone();
        for (variant, file) in entry["files"].as_object().unwrap() {
            let what = format!("{name} {variant}");
            let mut model = ScriptModel::load(tmp.0.join(file.as_str().unwrap()), Device::Cpu).unwrap();
            // Strict: anything left in float would be an error (an attention's out_proj is not).
            let report =
                model.quantize_layers(&RewriteConfig { strict: true, ..Default::default() }).unwrap();
            let rewritten: Vec<&str> = report.layers.iter().map(|l| l.name.as_str()).collect();
            // Every layer is rewritten or reported with its reason. An attention, scripted or
            // traced, is one rewritten layer holding both projections.
            let owner = |l: &str| {
                l.strip_suffix(".in_proj").or_else(|| l.strip_suffix(".out_proj")).unwrap_or(l).to_string()
            };
            for layer in &layers {
                let reported =
                    |p: &str| report.left_in_float.iter().any(|l| l.starts_with(&format!("{p}: ")));
                let covered = rewritten.contains(layer) || rewritten.contains(&owner(layer).as_str());
                assert!(
                    covered || reported(layer) || reported(&owner(layer)),
                    "{what}: {layer} neither rewritten nor reported"
                );
            }
            assert!(report.left_in_float.is_empty(), "{what}: left in float: {:?}", report.left_in_float);
            let attentions = layers.iter().filter(|l| l.ends_with(".in_proj")).count();
            assert_eq!(rewritten.len(), layers.len() - attentions, "{what}");
            if name == "vit" {
                // The traced attentions' settings come from running them: 2 heads, batch first
                // (torchvision's ViT), the output alone.
                let traced =
                    TracedAttention { heads: 2, weights: None, sources: [0, 0, 0], weights_first: false };
                let expected = Some(traced).filter(|_| variant == "traced");
                for l in report.layers.iter().filter(|l| l.name.ends_with("self_attention")) {
                    assert_eq!(
                        l.op,
                        LayerOp::Attention { batch_first: true, traced: expected, separate: false },
                        "{what}"
                    );
                }
            }
            model.calibrate(&x, 1, x.size()[0]).unwrap();
            // The alphas train: each gets a gradient from the logits.
            let y = model.forward(&x).unwrap();
            y.square().sum(tch::Kind::Float).backward();
            let alphas: Vec<(String, Tensor)> = model
                .parameters()
                .unwrap()
                .into_iter()
                .filter(|(n, _)| n.ends_with("quantizer.alpha"))
                .collect();
            // One input alpha per Linear/Conv2d, two per attention (its two projections).
            assert_eq!(alphas.len(), layers.len(), "{what}: one input alpha per projection");
            for (n, a) in &alphas {
                assert!(a.requires_grad() && a.grad().defined(), "{what}: {n} gets no gradient");
            }
            let y = tch::no_grad(|| model.forward(&x).unwrap());
            let out = tmp.0.join(format!("{name}-{variant}-q.pt"));
            model.save(&out).unwrap();
            let io = tmp.0.join(format!("{name}-{variant}-io.safetensors"));
            Tensor::write_safetensors(&[("x", x.shallow_clone()), ("y", y.shallow_clone())], &io).unwrap();
            let said = models_script(&["check".as_ref(), name.as_ref(), out.as_os_str(), io.as_os_str()]);
            eprintln!("{what}: {} layers rewritten; {}", rewritten.len(), said.trim());
            // Approximate mode with the exact table is Quantized mode (up to float sums).
            model.set_multiplier(Some(&Multiplier::exact())).unwrap();
            let exact_table = tch::no_grad(|| model.forward(&x).unwrap());
            assert_close(&exact_table, &y, 1e-5, 1e-4, &format!("{what}: exact table"));
            if name == "geometry" || name == "vit" {
                // A real multiplier in every geometry and in the attention's projections; the
                // saved file computes the same products in plain PyTorch (gathers from each
                // layer's table).
                model.set_multiplier(Some(&Multiplier::evoapprox("mul8s_1L2J").unwrap())).unwrap();
                let approx = tch::no_grad(|| model.forward(&x).unwrap());
                assert!((&approx - &y).abs().max().double_value(&[]) > 1e-3, "{what}: the multiplier shows");
                let out = tmp.0.join(format!("{name}-{variant}-approx.pt"));
                model.save(&out).unwrap();
                common::pytorch_agrees("torchscript_reload_check.py", &out, &x, approx, &what);
                // An attention's projections take its multiplier: it alone changes the logits.
                if let Some(att) = rewritten.iter().find(|l| l.ends_with("self_attention")) {
                    model.set_multiplier(None).unwrap();
                    model
                        .set_layer_multiplier(att, Some(&Multiplier::evoapprox("mul8s_1L2J").unwrap()))
                        .unwrap();
                    let only = tch::no_grad(|| model.forward(&x).unwrap());
                    let moved = (&only - &y).abs().max().double_value(&[]);
                    assert!(moved > 1e-3, "{what}: {att}'s multiplier changes nothing ({moved})");
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 9, "five models, four of them traced as well");
}
