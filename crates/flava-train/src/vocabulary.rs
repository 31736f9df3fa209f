//! Zero-shot vocabularies: the candidate classes (each with the label the data knows it by and
//! the name its prompts use) and prompt templates. Built in: ImageNet-1k's 1,000 classes in
//! their standard index order (sorted WordNet ids, as an ImageNet validation tree names its
//! folders, `n01440764` = "tench") with open_clip's class names, and CLIP's 80 ImageNet
//! templates (`data/` holds both, with their sources).

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;

/// `wnid<TAB>name`, 1,000 lines in class-index order (open_clip's `IMAGENET_CLASSNAMES`,
/// WordNet ids from CLIP_benchmark's `all_imagenet_wordnet_ids`).
const IMAGENET: &str = include_str!("../data/imagenet_classes.tsv");
/// CLIP's 80 ImageNet prompt templates (open_clip's `OPENAI_IMAGENET_TEMPLATES`), `{}` = class.
const OPENAI_TEMPLATES: &str = include_str!("../data/openai_templates.txt");

/// The candidate classes of zero-shot classification, in class-index order.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassVocabulary {
    /// The label each class has in the data (ImageFolder folder name, CSV label).
    pub keys: Vec<String>,
    /// The name that goes into the prompts.
    pub names: Vec<String>,
    by_key: HashMap<String, usize>,
    by_name: HashMap<String, usize>,
}

impl ClassVocabulary {
    /// `imagenet` (built in) or a file: one class per line, `label<TAB>name` or just `name`
    /// (then the label is the name); empty lines and lines starting with `#` are skipped.
    pub fn open(spec: &str) -> anyhow::Result<ClassVocabulary> {
        match spec {
            "imagenet" | "imagenet1k" | "imagenet-1k" => {
                ClassVocabulary::parse(IMAGENET, "the built-in ImageNet classes")
            }
            path => {
                let text = std::fs::read_to_string(Path::new(path))
                    .with_context(|| format!("--classes {path}: not `imagenet` and not a readable file"))?;
                ClassVocabulary::parse(&text, path)
            }
        }
    }

    /// Parses the file format of [`ClassVocabulary::open`]; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<ClassVocabulary> {
        let (mut keys, mut names) = (Vec::new(), Vec::new());
        let (mut by_key, mut by_name) = (HashMap::new(), HashMap::new());
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, name) = match line.split_once('\t') {
                Some((k, n)) => (k.trim(), n.trim()),
                None => (line.trim(), line.trim()),
            };
            if key.is_empty() || name.is_empty() {
                anyhow::bail!("{origin}, line {}: an empty label or class name", i + 1);
            }
            if by_key.insert(key.to_string(), keys.len()).is_some() {
                anyhow::bail!("{origin}, line {}: the label `{key}` is listed twice", i + 1);
            }
            // Names may repeat (ImageNet has two "missile" classes); a label lookup by name
            // takes the first.
            by_name.entry(name.to_string()).or_insert(keys.len());
            keys.push(key.to_string());
            names.push(name.to_string());
        }
        if keys.len() < 2 {
            anyhow::bail!("{origin}: zero-shot needs at least 2 classes, found {}", keys.len());
        }
        Ok(ClassVocabulary {
            keys,
            names,
            by_key,
            by_name,
        })
    }

    /// Classes.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Never true (at least 2 classes).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The class of a label in the data: by label first, then by name.
    pub fn index_of(&self, label: &str) -> Option<usize> {
        self.by_key.get(label).or_else(|| self.by_name.get(label)).copied()
    }
}

/// Prompt templates: `openai` (CLIP's 80, built in) or a file with one template per line
/// (each with one `{}`); empty lines and lines starting with `#` are skipped.
pub fn open_templates(spec: &str) -> anyhow::Result<Vec<String>> {
    let (text, origin) = match spec {
        "openai" | "openai-imagenet" => (
            OPENAI_TEMPLATES.to_string(),
            "the built-in OpenAI templates".to_string(),
        ),
        path => (
            std::fs::read_to_string(path)
                .with_context(|| format!("--templates {path}: not `openai` and not a readable file"))?,
            path.to_string(),
        ),
    };
    let templates: Vec<String> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if templates.is_empty() {
        anyhow::bail!("{origin}: no template");
    }
    if let Some(t) = templates.iter().find(|t| t.matches("{}").count() != 1) {
        anyhow::bail!("{origin}: the template `{t}` needs exactly one `{{}}` where the class name goes");
    }
    Ok(templates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imagenet_is_the_standard_index_order() {
        let v = ClassVocabulary::open("imagenet").unwrap();
        assert_eq!(v.len(), 1000);
        let mut sorted = v.keys.clone();
        sorted.sort();
        assert_eq!(sorted, v.keys, "class index = sorted WordNet id");
        assert!(v.keys.iter().all(|k| k.len() == 9 && k.starts_with('n')));
        // Spot checks of the standard mapping (index: wnid, name).
        for (i, wnid, name) in [
            (0, "n01440764", "tench"),
            (1, "n01443537", "goldfish"),
            (207, "n02099601", "Golden Retriever"),
            (281, "n02123045", "tabby cat"),
            (409, "n02708093", "analog clock"),
            (999, "n15075141", "toilet paper"),
        ] {
            assert_eq!((v.keys[i].as_str(), v.names[i].as_str()), (wnid, name));
            assert_eq!(v.index_of(wnid), Some(i));
            assert_eq!(v.index_of(name), Some(i));
        }
        assert_eq!(v.index_of("n99999999"), None);
    }

    #[test]
    fn openai_templates_are_clips_80() {
        let t = open_templates("openai").unwrap();
        assert_eq!(t.len(), 80);
        assert_eq!(t[0], "a bad photo of a {}.");
        assert_eq!(t[79], "a tattoo of the {}.");
        assert!(t.iter().all(|t| t.matches("{}").count() == 1));
    }

    #[test]
    fn files_parse_and_bad_ones_are_clear_errors() {
        let v = ClassVocabulary::parse("# my classes\nn1\tcat\n\nn2\tdog\r\nbird\n", "f").unwrap();
        assert_eq!(v.keys, ["n1", "n2", "bird"]);
        assert_eq!(v.names, ["cat", "dog", "bird"]);
        assert_eq!(
            (v.index_of("n2"), v.index_of("cat"), v.index_of("bird")),
            (Some(1), Some(0), Some(2))
        );
        let err = |text: &str| format!("{:#}", ClassVocabulary::parse(text, "f").unwrap_err());
        assert!(err("a\nb\na\n").contains("listed twice"));
        assert!(err("only\n").contains("at least 2"));
        assert!(err("x\t\ny\n").contains("empty"));
        let e = format!("{:#}", ClassVocabulary::open("/nonexistent/classes.txt").unwrap_err());
        assert!(e.contains("not `imagenet`"), "{e}");
        let dir = std::env::temp_dir().join(format!("flava-templates-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t.txt");
        std::fs::write(&f, "a photo of {}.\nno slot here\n").unwrap();
        let e = format!("{:#}", open_templates(f.to_str().unwrap()).unwrap_err());
        assert!(e.contains("no slot here"), "{e}");
        std::fs::write(&f, "# only a comment\n").unwrap();
        assert!(open_templates(f.to_str().unwrap()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
