//! `flava eval zero-shot` with vocabularies: a class file maps WordNet-id folders to names and
//! gives the top-1 that the prompts' own embeddings (`flava embed`) predict; `--classes imagenet`
//! scores against all 1,000 classes and matches folders by WordNet id or by name alike; a label
//! the vocabulary lacks is a clear error.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model() -> PathBuf {
    fixtures().join("embed_model")
}

/// An ImageFolder tree: `folders[i]` holds copies of the images of `sources[i]`.
fn image_folder(root: &Path, folders: &[&str], sources: &[&str]) -> Vec<(String, PathBuf)> {
    let _ = std::fs::remove_dir_all(root);
    let mut images = Vec::new();
    for (folder, src) in folders.iter().zip(sources) {
        std::fs::create_dir_all(root.join(folder)).unwrap();
        for f in ["0.png", "1.png"] {
            let to = root.join(folder).join(f);
            std::fs::copy(fixtures().join("tasks/imagefolder").join(src).join(f), &to).unwrap();
            images.push((folder.to_string(), to));
        }
    }
    images
}

fn zero_shot(data: &Path, extra: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_flava"))
        .args(["eval", "zero-shot", "--json", "--model"])
        .arg(model())
        .arg("--data")
        .arg(data)
        .args(extra)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn unit(v: &[f64]) -> Vec<f64> {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter().map(|x| x / n).collect()
}

fn rows(v: &serde_json::Value) -> Vec<Vec<f64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
        .collect()
}

#[test]
fn class_files_and_imagenet_vocabulary() {
    let root = std::env::temp_dir().join(format!("flava-zero-shot-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let templates = root.join("templates.txt");
    std::fs::write(&templates, "a photo of a {}.\n# a comment\na picture of the {}.\n").unwrap();
    let classes = root.join("classes.tsv");
    // Names the tiny fixture tokenizer knows (ImageNet's would all be [UNK] to it).
    std::fs::write(&classes, "n01440764\tcat\nn01443537\tdog\n").unwrap();
    let t = templates.to_str().unwrap();

    let by_wnid = root.join("by_wnid");
    let images = image_folder(&by_wnid, &["n01440764", "n01443537"], &["cat", "dog"]);
    let by_name = root.join("by_name");
    image_folder(&by_name, &["cat", "dog"], &["cat", "dog"]);
    let by_imagenet_name = root.join("by_imagenet_name");
    image_folder(&by_imagenet_name, &["tench", "goldfish"], &["cat", "dog"]);

    // The class file: WordNet-id folders, prompts with the names.
    let z = zero_shot(&by_wnid, &["--classes", classes.to_str().unwrap(), "--templates", t]).unwrap();
    assert_eq!(z["classes"], serde_json::json!(["cat", "dog"]));
    assert_eq!(z["n_images"], 4);
    // The same top-1 from the model's own embeddings of the 2 x 2 prompts and the 4 images:
    // class vector = normalised mean of the normalised prompt features, prediction = best cosine.
    let prompts = [
        "a photo of a cat.",
        "a picture of the cat.",
        "a photo of a dog.",
        "a picture of the dog.",
    ];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flava"));
    cmd.args(["embed", "--json", "--max-length", "64", "--model"])
        .arg(model());
    for (_, img) in &images {
        cmd.arg("--image").arg(img);
    }
    for p in prompts {
        cmd.args(["--text", p]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text: Vec<Vec<f64>> = rows(&e["text_features"]).iter().map(|r| unit(r)).collect();
    let class: Vec<Vec<f64>> = (0..2)
        .map(|c| {
            unit(
                &(0..text[0].len())
                    .map(|k| (text[2 * c][k] + text[2 * c + 1][k]) / 2.0)
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let correct = rows(&e["image_features"])
        .iter()
        .zip(&images)
        .filter(|(f, (folder, _))| {
            let f = unit(f);
            let score = |c: &Vec<f64>| f.iter().zip(c).map(|(a, b)| a * b).sum::<f64>();
            let predicted = if score(&class[0]) >= score(&class[1]) { 0 } else { 1 };
            predicted == usize::from(folder == "n01443537")
        })
        .count();
    assert_eq!(z["top1"].as_f64().unwrap(), correct as f64 / 4.0, "{z}");
    assert_eq!(z["top5"].as_f64().unwrap(), 1.0, "2 classes: always in the top 5");
    // Folders named by the class names, no vocabulary: the same result.
    let plain = zero_shot(&by_name, &["--templates", t]).unwrap();
    assert_eq!(plain["top1"], z["top1"]);

    // ImageNet: all 1,000 classes are candidates; WordNet-id and name folders are the same classes.
    let imagenet: Vec<serde_json::Value> = [&by_wnid, &by_imagenet_name]
        .iter()
        .map(|d| zero_shot(d, &["--classes", "imagenet", "--templates", t]).unwrap())
        .collect();
    for z in &imagenet {
        let names = z["classes"].as_array().unwrap();
        assert_eq!(names.len(), 1000);
        assert_eq!(
            (names[0].as_str(), names[999].as_str()),
            (Some("tench"), Some("toilet paper"))
        );
        assert_eq!(z["n_images"], 4);
        assert!(z["top1"].as_f64().unwrap() <= z["top5"].as_f64().unwrap());
    }
    assert_eq!(imagenet[0]["top1"], imagenet[1]["top1"]);
    assert_eq!(imagenet[0]["top5"], imagenet[1]["top5"]);

    // A folder the vocabulary does not name: an error that names it.
    let odd = root.join("odd");
    image_folder(&odd, &["n01440764", "n99999999"], &["cat", "dog"]);
    let err = zero_shot(&odd, &["--classes", "imagenet", "--templates", t]).unwrap_err();
    assert!(err.contains("n99999999") && err.contains("does not list"), "{err}");
    // Bad vocabulary arguments fail before the model loads.
    let err = zero_shot(&by_wnid, &["--classes", "/nonexistent/classes.txt"]).unwrap_err();
    assert!(err.contains("not `imagenet`"), "{err}");
    std::fs::write(&templates, "no slot\n").unwrap();
    let err = zero_shot(&by_wnid, &["--templates", t]).unwrap_err();
    assert!(err.contains("exactly one `{}`"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}
