//! Image folders, as torchvision's `ImageFolder` reads them: one subfolder per class (sorted
//! names are the labels), PNG and JPEG files, each decoded, its shorter side resized and the
//! center cropped, on several threads.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use tch::Tensor;

use super::{DataSet, ImageSet, LoadOptions};
use crate::{Error, Result};

/// Image files of a class folder: PNG and JPEG by extension, in sorted order.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let fail = |problem: String| Error::DataFile { path: dir.to_path_buf(), problem };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| fail(e.to_string()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(fail("an empty class folder: no .png, .jpg or .jpeg file in it".into()));
    }
    Ok(files)
}

/// The class subfolders of `dir`, by sorted name.
fn class_folders(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let fail = |problem: String| Error::DataFile { path: dir.to_path_buf(), problem };
    let mut classes: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| fail(e.to_string()))?
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    classes.sort();
    if classes.is_empty() {
        return Err(fail(
            "not a data set: no MNIST, CIFAR or safetensors files, and no class subfolders".into(),
        ));
    }
    Ok(classes)
}

/// One image as `[3, H, W]` bytes: decoded, shorter side resized to `resize`, center cropped.
fn decode(path: &Path, resize: u32, [ch, cw]: [u32; 2]) -> std::result::Result<Vec<u8>, String> {
    crate::files::check_input_file(path, None).map_err(|e| e.to_string())?;
    let img = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| e.to_string())?
        .decode()
        .map_err(|e| format!("cannot decode the image: {e}"))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    let scale = resize as f64 / w.min(h).max(1) as f64;
    let (nw, nh) = ((w as f64 * scale).round().max(1.0) as u32, (h as f64 * scale).round().max(1.0) as u32);
    // An elongated image must not become gigabytes when its shorter side is resized.
    if nw.max(nh) > 16 * resize.max(cw).max(ch) {
        return Err(format!("{w}x{h} is too elongated to resize its shorter side to {resize}"));
    }
    if nw < cw || nh < ch {
        return Err(format!("{w}x{h} resized to {nw}x{nh} is smaller than the {cw}x{ch} crop"));
    }
    let resized = image::imageops::resize(&img, nw, nh, FilterType::Triangle);
    let (left, top) = ((nw - cw) / 2, (nh - ch) / 2);
    let crop = image::imageops::crop_imm(&resized, left, top, cw, ch).to_image();
    let plane = (ch * cw) as usize;
    let mut out = vec![0u8; 3 * plane];
    for (i, px) in crop.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = px.0[c];
        }
    }
    Ok(out)
}

/// The split at `dir` (one subfolder per class, labelled by `classes`' order).
fn split(dir: &Path, classes: &[String], options: &LoadOptions) -> Result<ImageSet> {
    let mut files = Vec::new();
    for (name, path) in class_folders(dir)? {
        let label = classes.iter().position(|c| c == &name).ok_or_else(|| Error::DataFile {
            path: path.clone(),
            problem: format!("class {name:?} is not among the training classes"),
        })?;
        files.extend(image_files(&path)?.into_iter().map(|f| (f, label as i64)));
    }
    let [h, w] = options.size;
    if h < 1 || w < 1 || h > 4096 || w > 4096 {
        return Err(Error::Argument {
            what: "image size",
            value: h.min(w) as f64,
            expected: "1 to 4096 pixels",
        });
    }
    let resize = options.resize.unwrap_or(h.max(w) * 256 / 224).clamp(h.max(w), 8192) as u32;
    let threads = match options.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let size = [h as u32, w as u32];
    let chunk = files.len().div_ceil(threads.max(1)).max(1);
    let decoded: Vec<std::result::Result<Vec<u8>, (PathBuf, String)>> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|(f, _)| decode(f, resize, size).map_err(|e| (f.clone(), e)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    let mut pixels = Vec::with_capacity(files.len() * 3 * (h * w) as usize);
    for d in decoded {
        let bytes = d.map_err(|(path, problem)| Error::DataFile { path, problem })?;
        pixels.extend_from_slice(&bytes);
    }
    let n = files.len() as i64;
    if pixels.len() as i64 != n * 3 * h * w {
        return Err(Error::DataFile { path: dir.to_path_buf(), problem: "a decoding thread failed".into() });
    }
    let labels: Vec<i64> = files.iter().map(|(_, l)| *l).collect();
    Ok(ImageSet {
        images: Tensor::f_from_slice(&pixels)?.f_reshape([n, 3, h, w])?,
        labels: Tensor::f_from_slice(&labels)?,
    })
}

/// The image folder `root`: `train/` with `val/` or `test/`, or class folders directly (then
/// both splits are those images).
pub(super) fn load(root: &Path, options: &LoadOptions) -> Result<DataSet> {
    let train_dir = root.join("train");
    let (train_dir, test_dir) = if train_dir.is_dir() {
        let test = ["val", "test"].iter().map(|n| root.join(n)).find(|p| p.is_dir()).ok_or_else(|| {
            Error::DataFile {
                path: root.to_path_buf(),
                problem: "a train/ folder without val/ or test/".into(),
            }
        })?;
        (train_dir, test)
    } else {
        (root.to_path_buf(), root.to_path_buf())
    };
    let classes: Vec<String> = class_folders(&train_dir)?.into_iter().map(|(n, _)| n).collect();
    let train = split(&train_dir, &classes, options)?;
    let test = if test_dir == train_dir {
        ImageSet { images: train.images.shallow_clone(), labels: train.labels.shallow_clone() }
    } else {
        split(&test_dir, &classes, options)?
    };
    DataSet::checked(train, test, root, "image folder")
}
