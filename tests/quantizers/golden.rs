//! Golden tests: our quantizers against TorchApprox's semantics computed by PyTorch (scripts/fixtures/gen_fixtures.py).

use crate::common;

use common::{assert_exact, load_fixture};
use tch::{nn, Device, Kind, Tensor};
use torchapprox::quantizers::{
    f_minmax_quant, int_max, pact_quant, ApproxQuantizer, MinMaxQuant, PACTQuant, QuantConfig,
};

struct Case {
    name: String,
    x: Tensor,
    bits: u32,
    alpha: f64,
    minmax_q: Tensor,
    minmax_fq: Tensor,
    pact: Option<(Tensor, Tensor)>,
}

fn cases() -> Vec<Case> {
    let mut f = load_fixture("quantizers.safetensors");
    let count = f["count"].int64_value(&[]);
    assert!(count >= 40, "fixture holds only {count} cases");
    (0..count)
        .map(|i| {
            let mut take = |k: &str| f.remove(&format!("c{i}.{k}"));
            let x = take("x").unwrap();
            let bits = take("bits").unwrap().int64_value(&[]) as u32;
            let alpha = take("alpha").unwrap().double_value(&[0]);
            let minmax_q = take("minmax_q").unwrap();
            let minmax_fq = take("minmax_fq").unwrap();
            let pact = take("pact_q").map(|q| (q, take("pact_fq").unwrap()));
            Case {
                name: format!("case {i} ({bits} bits, alpha {alpha}, shape {:?})", x.size()),
                x,
                bits,
                alpha,
                minmax_q,
                minmax_fq,
                pact,
            }
        })
        .collect()
}

#[test]
fn minmax_matches_pytorch_exactly() {
    for c in cases() {
        let q = MinMaxQuant::new(common::scratch().root() / "minmax", c.bits);
        assert_exact(&q.quantize(&c.x), &c.minmax_q, &format!("minmax quantize, {}", c.name));
        assert_exact(
            &q.f_fake_quantize(&c.x).unwrap(),
            &c.minmax_fq,
            &format!("minmax fake quantize, {}", c.name),
        );
        // The Quant node with the same range gives the same integers.
        let m = c.x.abs().max().double_value(&[]);
        let node = f_minmax_quant(&c.x, m, int_max(c.bits)).unwrap();
        assert_exact(&node, &c.minmax_q, &format!("minmax_quant node, {}", c.name));
    }
}

#[test]
fn pact_matches_pytorch_exactly() {
    let mut checked = 0;
    for c in cases() {
        let Some((pq, pfq)) = &c.pact else { continue };
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = QuantConfig { bitwidth: c.bits, init_alpha: c.alpha, ..Default::default() };
        let q = PACTQuant::from_config(vs.root(), cfg).unwrap();
        // alpha is stored as float32, as in PyTorch.
        assert_eq!(q.alpha().double_value(&[0]), c.alpha as f32 as f64);
        assert_exact(&q.quantize(&c.x), pq, &format!("pact quantize, {}", c.name));
        assert_exact(&q.f_fake_quantize(&c.x).unwrap(), pfq, &format!("pact fake quantize, {}", c.name));
        let alpha = Tensor::from_slice(&[c.alpha as f32]);
        assert_exact(&pact_quant(&c.x, &alpha, int_max(c.bits)), pq, &format!("pact_quant node, {}", c.name));
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} PACT cases");
}

#[test]
fn fixtures_contain_real_ties() {
    // Guards the fixture itself: ties must be present and resolved half-to-even.
    let mut ties = 0;
    for c in cases().iter().filter(|c| c.x.kind() == Kind::Float) {
        let s = (int_max(c.bits) as f32 / c.alpha as f32) as f64;
        let scaled = (&c.x * s).to_kind(Kind::Float);
        let frac = (&scaled - scaled.floor()).eq(0.5);
        ties += frac.sum(Kind::Int64).int64_value(&[]);
    }
    assert!(ties >= 100, "only {ties} inputs sit exactly on a rounding tie");
}

#[test]
fn half_precision_inputs_match_float32_on_the_same_values() {
    for c in cases().iter().filter(|c| c.x.kind() == Kind::Float && c.x.numel() > 10) {
        for kind in [Kind::Half, Kind::BFloat16] {
            let xh = c.x.to_kind(kind);
            let x32 = xh.to_kind(Kind::Float);
            let q = MinMaxQuant::new(common::scratch().root() / "minmax", c.bits);
            let (a, b) = (q.quantize(&xh), q.quantize(&x32));
            assert_eq!(a.kind(), Kind::Float, "half inputs quantize to float32 integers");
            assert_exact(&a, &b, &format!("minmax {kind:?} vs float32, {}", c.name));
            let fq = q.f_fake_quantize(&xh).unwrap();
            assert_eq!(fq.kind(), kind, "fake quantization keeps the input dtype");
            assert_exact(
                &fq,
                &q.f_fake_quantize(&x32).unwrap().to_kind(kind),
                &format!("minmax fq {kind:?}, {}", c.name),
            );

            let vs = nn::VarStore::new(Device::Cpu);
            let p = PACTQuant::from_config(
                vs.root(),
                QuantConfig { bitwidth: c.bits, init_alpha: c.alpha, ..Default::default() },
            )
            .unwrap();
            assert_exact(
                &p.quantize(&xh),
                &p.quantize(&x32),
                &format!("pact {kind:?} vs float32, {}", c.name),
            );
        }
    }
}
