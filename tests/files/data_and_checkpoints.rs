//! The MNIST loader on the vendored digits, and checkpoint writing and checking.

use crate::common;

use tch::{nn, Device, Kind, Tensor};
use torchapprox::checkpoint::{load_checked, save_atomic};
use torchapprox::data::{normalize, Mnist};
use torchapprox::models::Architecture;

#[test]
fn vendored_mnist_loads_with_its_documented_counts() {
    let m = Mnist::load_dir(common::embedded_dir()).unwrap();
    assert_eq!(m.train_images.size(), [8000, 28, 28]);
    assert_eq!(m.test_images.size(), [2000, 28, 28]);
    assert_eq!(m.train_images.kind(), Kind::Uint8);
    // Every class is present in both splits (80/20 per class).
    for labels in [&m.train_labels, &m.test_labels] {
        let counts = labels.bincount::<Tensor>(None, 10);
        assert_eq!(counts.size(), [10]);
        assert!(counts.min().int64_value(&[]) > 100, "{counts:?}");
    }
    // Real digits: mostly background, strokes at full intensity.
    let mean = m.train_images.to_kind(Kind::Float).mean(Kind::Float).double_value(&[]) / 255.0;
    assert!((0.1..0.15).contains(&mean), "mean intensity {mean}");
    let x = normalize(&m.test_images, 0.1307, 0.3081, Device::Cpu).unwrap();
    assert_eq!(x.size(), [2000, 1, 28, 28]);
    assert!(normalize(&m.test_images, 0.0, 0.0, Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("std must be positive"));

    // Plain files written back load to the same tensors.
    let tmp = common::TempDir::new("idx");
    let dir = tmp.0.clone();
    m.subset(50, 20).save_dir(&dir).unwrap();
    let back = Mnist::load_dir(&dir).unwrap();
    assert!(back.train_images.equal(&m.train_images.narrow(0, 0, 50)));
    assert!(back.test_labels.equal(&m.test_labels.narrow(0, 0, 20)));
    // A label outside 0..=9 is named.
    let labels = dir.join("t10k-labels-idx1-ubyte");
    let mut bytes = std::fs::read(&labels).unwrap();
    bytes[8] = 42;
    std::fs::write(&labels, bytes).unwrap();
    assert!(Mnist::load_dir(&dir).unwrap_err().to_string().ends_with("label 42 is not a digit 0..=9"));
}

#[test]
fn checkpoints_are_written_atomically_and_checked_on_load() {
    let tmp = common::TempDir::new("ckpt");
    let dir = tmp.0.clone();
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = Architecture::Mlp.build(&vs.root(), |_| Default::default()).unwrap();
    let path = dir.join("mlp.safetensors");
    save_atomic(&vs, &path).unwrap();
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, [std::ffi::OsString::from("mlp.safetensors")], "no temporary file is left behind");
    let e = save_atomic(&vs, dir.join("mlp.pt")).unwrap_err();
    assert!(e.to_string().ends_with("checkpoints are written as .safetensors"));

    let mut same = nn::VarStore::new(Device::Cpu);
    let _n = Architecture::Mlp.build(&same.root(), |_| Default::default()).unwrap();
    load_checked(&mut same, &path).unwrap();
    for (name, t) in vs.variables() {
        assert!(t.equal(&same.variables()[&name]), "{name} differs after load");
    }

    let mut other = nn::VarStore::new(Device::Cpu);
    let _l = Architecture::LeNet5.build(&other.root(), |_| Default::default()).unwrap();
    let before: Vec<f64> = common::values(&other.variables()["fc1.weight"]);
    let e = load_checked(&mut other, &path).unwrap_err().to_string();
    assert!(e.contains("missing conv1.bias"), "{e}");
    assert!(e.contains("fc1.weight has shape [256, 784], the model needs [120, 400]"), "{e}");
    assert!(e.contains("unexpected fc1.x_quantizer.alpha") || e.contains("missing fc3.weight"), "{e}");
    assert_eq!(common::values(&other.variables()["fc1.weight"]), before, "a refused load changes nothing");
    let e = load_checked(&mut other, dir.join("absent.safetensors")).unwrap_err().to_string();
    assert!(e.ends_with("absent.safetensors: no such file"), "{e}");
    std::fs::write(dir.join("junk.safetensors"), b"junk").unwrap();
    let e = load_checked(&mut other, dir.join("junk.safetensors")).unwrap_err().to_string();
    assert!(e.contains("not a readable .safetensors file"), "{e}");
}
