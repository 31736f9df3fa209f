//! The three encoders of FLAVA, by name: what `--freeze` takes and task heads are fed from.

use serde::{Deserialize, Serialize};

/// One of FLAVA's encoders. Spelled `image`, `text`, `multimodal` everywhere (options,
/// configuration files, logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tower {
    /// The ViT image encoder (`image_model.*`).
    Image,
    /// The text encoder (`text_model.*`).
    Text,
    /// The multimodal encoder (`multimodal_model.*`).
    Multimodal,
}

impl Tower {
    /// Every tower.
    pub const ALL: [Tower; 3] = [Tower::Image, Tower::Text, Tower::Multimodal];

    /// The one spelling of the tower.
    pub fn name(self) -> &'static str {
        match self {
            Tower::Image => "image",
            Tower::Text => "text",
            Tower::Multimodal => "multimodal",
        }
    }

    /// The field of [`crate::FlavaModel`] (and the checkpoint key prefix) holding it.
    pub fn module_name(self) -> &'static str {
        match self {
            Tower::Image => "image_model",
            Tower::Text => "text_model",
            Tower::Multimodal => "multimodal_model",
        }
    }
}

impl std::fmt::Display for Tower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A tower name that is none of `image`, `text`, `multimodal`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tower `{0}` (image, text or multimodal)")]
pub struct UnknownTower(pub String);

impl std::str::FromStr for Tower {
    type Err = UnknownTower;
    fn from_str(s: &str) -> Result<Self, UnknownTower> {
        Tower::ALL
            .into_iter()
            .find(|t| t.name() == s.trim())
            .ok_or_else(|| UnknownTower(s.trim().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_spelling_each() {
        for t in Tower::ALL {
            assert_eq!(t.name().parse::<Tower>().unwrap(), t);
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{}\"", t.name()));
        }
        assert_eq!(
            "images".parse::<Tower>().unwrap_err().to_string(),
            "unknown tower `images` (image, text or multimodal)"
        );
    }
}
