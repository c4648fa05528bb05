//! Data sets of every format `DataSet::load` reads, made small here: CIFAR-10 and CIFAR-100
//! binary folders, image folders (PNG and JPEG), safetensors files; what each decodes to,
//! one-line errors naming the bad file, and quantize_torchscript on them.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::TempDir;
use tch::{Device, Kind, Tensor};
use torchapprox::data::{
    crop_flip, crop_flip_draws, normalize_channels, random_crop_flip, DataSet, LoadOptions,
};

/// CIFAR records: `label_bytes` labels (the last is the class `i % 7`), then 3072 pixels
/// whose red plane is `i`, green `2i` and blue `3i` (mod 256).
fn cifar_file(path: &Path, n: usize, label_bytes: usize) {
    let mut bytes = Vec::new();
    for i in 0..n {
        for b in 0..label_bytes {
            bytes.push(if b + 1 == label_bytes { (i % 7) as u8 } else { 99 });
        }
        for c in 1..=3 {
            bytes.extend(std::iter::repeat((i * c % 256) as u8).take(1024));
        }
    }
    std::fs::write(path, bytes).unwrap();
}

fn solid_image(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    image::RgbImage::from_pixel(w, h, image::Rgb(rgb)).save(path).unwrap();
}

fn load_err(path: &Path, options: &LoadOptions) -> String {
    DataSet::load(path, options).unwrap_err().to_string()
}

#[test]
fn every_format_loads_as_images_and_labels_and_bad_data_names_the_file() {
    let tmp = TempDir::new("data-formats");
    let opts = LoadOptions { size: [16, 16], ..Default::default() };
    // CIFAR-10: five training batches at most, one test batch, one label byte.
    let c10 = tmp.0.join("cifar10");
    std::fs::create_dir_all(&c10).unwrap();
    cifar_file(&c10.join("data_batch_1.bin"), 12, 1);
    cifar_file(&c10.join("data_batch_2.bin"), 8, 1);
    cifar_file(&c10.join("test_batch.bin"), 5, 1);
    let d = DataSet::load(&c10, &opts).unwrap();
    assert_eq!(
        (d.format, d.train.images.size(), d.test.images.size()),
        ("cifar10", vec![20, 3, 32, 32], vec![5, 3, 32, 32])
    );
    assert_eq!(d.classes, 7);
    assert_eq!(d.train.labels.int64_value(&[13]), 1, "batch 2's second record is i = 1");
    assert_eq!(d.test.images.int64_value(&[4, 2, 31, 31]), 12, "blue plane of record 4");
    // CIFAR-100: coarse then fine label; the fine one is the class.
    let c100 = tmp.0.join("cifar100");
    std::fs::create_dir_all(&c100).unwrap();
    cifar_file(&c100.join("train.bin"), 9, 2);
    cifar_file(&c100.join("test.bin"), 3, 2);
    let d = DataSet::load(&c100, &opts).unwrap();
    assert_eq!((d.format, d.train.len(), d.test.len(), d.classes), ("cifar100", 9, 3, 7));
    // A truncated record names the file and the record size.
    let bytes = std::fs::read(c10.join("test_batch.bin")).unwrap();
    std::fs::write(c10.join("test_batch.bin"), &bytes[..bytes.len() - 1]).unwrap();
    let e = load_err(&c10, &opts);
    assert!(e.contains("test_batch.bin") && e.contains("not a whole number of 3073-byte records"), "{e}");
    std::fs::remove_file(c10.join("test_batch.bin")).unwrap();
    assert!(load_err(&c10, &opts).contains("a CIFAR folder without test_batch.bin"));

    // Image folders: train/ and val/, a class per subfolder, PNG and JPEG of any size.
    let imgs = tmp.0.join("images");
    for (split, class, name, w, h, rgb) in [
        ("train", "cat", "a.png", 40, 30, [200, 10, 10]),
        ("train", "cat", "b.jpg", 30, 60, [200, 10, 10]),
        ("train", "dog", "c.png", 20, 20, [10, 200, 10]),
        ("val", "dog", "d.png", 64, 32, [10, 200, 10]),
        ("val", "cat", "e.png", 32, 32, [200, 10, 10]),
    ] {
        let dir = imgs.join(split).join(class);
        std::fs::create_dir_all(&dir).unwrap();
        solid_image(&dir.join(name), w, h, rgb);
    }
    std::fs::write(imgs.join("train/cat/notes.txt"), "not an image").unwrap();
    let d = DataSet::load(&imgs, &opts).unwrap();
    assert_eq!(
        (d.format, d.train.images.size(), d.test.images.size()),
        ("image folder", vec![3, 3, 16, 16], vec![2, 3, 16, 16])
    );
    assert_eq!(Vec::<i64>::try_from(&d.train.labels).unwrap(), [0, 0, 1], "classes in sorted order");
    assert_eq!(Vec::<i64>::try_from(&d.test.labels).unwrap(), [0, 1]);
    // A solid colour stays that colour through resizing and cropping (JPEG within its loss).
    assert_eq!(d.train.images.int64_value(&[0, 0, 8, 8]), 200);
    assert!((d.train.images.int64_value(&[1, 0, 8, 8]) - 200).abs() <= 3);
    assert_eq!(d.test.images.int64_value(&[1, 1, 3, 12]), 200);
    // One subfolder per class directly: both splits are those images.
    let flat = imgs.join("train");
    let d = DataSet::load(&flat, &opts).unwrap();
    assert_eq!((d.train.len(), d.test.len()), (3, 3));
    // An unreadable image, an empty class, a missing val/: each names the file or folder.
    std::fs::write(imgs.join("val/dog/broken.png"), b"\x89PNG not really").unwrap();
    let e = load_err(&imgs, &opts);
    assert!(e.contains("broken.png") && e.contains("cannot decode the image"), "{e}");
    std::fs::remove_file(imgs.join("val/dog/broken.png")).unwrap();
    std::fs::create_dir_all(imgs.join("train/emu")).unwrap();
    let e = load_err(&imgs, &opts);
    assert!(e.contains("emu") && e.contains("empty class folder"), "{e}");
    std::fs::remove_dir(imgs.join("train/emu")).unwrap();
    std::fs::create_dir_all(imgs.join("val/emu2")).unwrap();
    solid_image(&imgs.join("val/emu2/x.png"), 20, 20, [1, 2, 3]);
    let e = load_err(&imgs, &opts);
    assert!(e.contains("emu2") && e.contains("not among the training classes"), "{e}");

    // safetensors: `images` and `labels` (both splits), u8 or float.
    let st = tmp.0.join("set.safetensors");
    let images = Tensor::arange(6 * 3 * 4 * 4, (Kind::Int64, Device::Cpu))
        .remainder(256)
        .to_kind(Kind::Uint8)
        .reshape([6, 3, 4, 4]);
    let labels = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2]);
    Tensor::write_safetensors(&[("images", images.shallow_clone()), ("labels", labels.shallow_clone())], &st)
        .unwrap();
    let d = DataSet::load(&st, &opts).unwrap();
    assert_eq!((d.format, d.train.len(), d.test.len(), d.classes), ("safetensors", 6, 6, 3));
    let floats = tmp.0.join("floats.safetensors");
    Tensor::write_safetensors(
        &[
            ("train_images", images.to_kind(Kind::Float) / 255.0),
            ("train_labels", labels.to_kind(Kind::Int)),
            ("test_images", images.narrow(0, 0, 2).to_kind(Kind::Float) / 255.0),
            ("test_labels", labels.narrow(0, 0, 2)),
        ],
        &floats,
    )
    .unwrap();
    let d = DataSet::load(&floats, &opts).unwrap();
    assert_eq!((d.train.len(), d.test.len(), d.train.labels.kind()), (6, 2, Kind::Int64));
    let bad = tmp.0.join("bad.safetensors");
    Tensor::write_safetensors(
        &[("images", images.shallow_clone()), ("labels", labels.narrow(0, 0, 5))],
        &bad,
    )
    .unwrap();
    let e = load_err(&bad, &opts);
    assert!(e.contains("bad.safetensors") && e.contains("6 images but 5 labels"), "{e}");
    Tensor::write_safetensors(&[("images", images.shallow_clone())], &bad).unwrap();
    assert!(load_err(&bad, &opts).contains("needs both images and labels"));
    let e = load_err(&tmp.0.join("nowhere"), &opts);
    assert!(e.contains("nowhere"), "{e}");
}

#[test]
fn normalisation_is_per_channel_and_augmentation_crops_and_flips() {
    let x = Tensor::from_slice(&[255u8, 0, 51]).reshape([1, 3, 1, 1]);
    let y = normalize_channels(&x, &[0.5], &[0.5, 0.25, 0.1], Device::Cpu).unwrap();
    common::assert_close(
        &y.flatten(0, -1),
        &Tensor::from_slice(&[1.0f32, -2.0, -3.0]),
        1e-6,
        1e-6,
        "per channel",
    );
    let e = normalize_channels(&x, &[0.5, 0.5], &[1.0], Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("mean values") && e.contains("one per image channel"), "{e}");
    // Every augmented image is its original shifted by at most `pad` and maybe mirrored.
    tch::manual_seed(3);
    let x = Tensor::rand([64, 1, 6, 6], (Kind::Float, Device::Cpu)) + 1.0;
    let a = random_crop_flip(&x, 2).unwrap();
    assert_eq!(a.size(), x.size());
    let (mut flipped, mut moved) = (0, 0);
    for i in 0..64 {
        let img = a.get(i).get(0);
        let orig = x.get(i).get(0).constant_pad_nd([2, 2, 2, 2]);
        let found = (0..5).flat_map(|dy| (0..5).map(move |dx| (dy, dx))).find_map(|(dy, dx)| {
            let crop = orig.narrow(0, dy, 6).narrow(1, dx, 6);
            if crop.equal(&img) {
                Some((dy, dx, false))
            } else if crop.flip([1]).equal(&img) {
                Some((dy, dx, true))
            } else {
                None
            }
        });
        let (dy, dx, flip) = found.unwrap_or_else(|| panic!("image {i} is no crop of its original"));
        flipped += flip as i32;
        moved += (dy != 2 || dx != 2) as i32;
    }
    assert!((16..=48).contains(&flipped) && moved > 32, "flipped {flipped}, moved {moved} of 64");
    // Draws made ahead (as the fine-tuning's batch producer uses them) give the same images.
    tch::manual_seed(3);
    let _ = Tensor::rand([64, 1, 6, 6], (Kind::Float, Device::Cpu)); // x's draws, as above
    let (offsets, flips) = crop_flip_draws(64, 2).unwrap();
    assert!(crop_flip(&x, 2, &offsets, &flips).unwrap().equal(&a));
    let e = crop_flip(&x, 2, &offsets.narrow(0, 0, 8), &flips).unwrap_err().to_string();
    assert!(e.contains("crop offsets and flips") && e.contains("[64, 2]"), "{e}");
}

#[test]
fn quantize_torchscript_reads_cifar_folders_and_refuses_labels_beyond_the_model() {
    let tmp = TempDir::new("data-cli");
    let c10 = tmp.0.join("cifar10");
    std::fs::create_dir_all(&c10).unwrap();
    cifar_file(&c10.join("data_batch_1.bin"), 64, 1);
    cifar_file(&c10.join("test_batch.bin"), 32, 1);
    let model = tmp.0.join("cnn.pt");
    let script = format!(
        "import torch, torch.nn as nn\ntorch.manual_seed(0)\nm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, {{}}))\n\
         torch.jit.script(m.eval()).save({:?})\nm2 = nn.Sequential(nn.Flatten(), nn.Linear(3072, 5))\ntorch.jit.script(m2.eval()).save({:?})\n",
        model.to_str().unwrap(),
        tmp.0.join("five.pt").to_str().unwrap()
    )
    .replace("{}", "10");
    let o = Command::new(common::python()).args(["-c", &script]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bin = common::example_bin("quantize_torchscript");
    let run = |model: &Path, extra: &[&str]| {
        let mut args = vec!["--model", model.to_str().unwrap(), "--data", c10.to_str().unwrap()];
        args.extend_from_slice(extra);
        Command::new(&bin).args(&args).env_remove("RUST_BACKTRACE").output().unwrap()
    };
    let o = run(
        &model,
        &[
            "--x-quant",
            "pact",
            "--calibrate",
            "1",
            "--mean",
            "0.5,0.4,0.3",
            "--std",
            "0.2,0.2,0.2",
            "--finetune-epochs",
            "1",
            "--augment",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["data"]["format"], "cifar10", "{r}");
    assert_eq!((r["data"]["train"].as_i64(), r["data"]["test"].as_i64()), (Some(64), Some(32)));
    assert_eq!(r["layers"].as_array().unwrap().len(), 2, "{r}");
    // Labels 0..6 through a model of 5 classes: one line naming the data.
    let o = run(&tmp.0.join("five.pt"), &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && stderr.contains("cifar10: its labels go up to 6 but the model has 5 output classes"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    for (args, needle) in [
        (&["--mean", "0.5,0.5"][..], "one per image channel"),
        (&["--limit", "0"][..], "--limit must be at least 1 image per split, got 0"),
        (&["--image-size", "0"][..], "--image-size must be from 1 to 4096 pixels, got 0"),
        (&["--image-size", "99999"][..], "--image-size must be from 1 to 4096 pixels, got 99999"),
    ] {
        let o = run(&model, args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && stderr.contains(needle), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    }
}
