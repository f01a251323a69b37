//! Config files: TOML, layered as built-in defaults ← config file ← `--set key=value` overrides.
//! Unknown keys are errors (a typo must not silently fall back to a default).
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Error, Result};

/// Builds a config of type `T`: its `Default`, overlaid with the TOML file at `path` (if any),
/// overlaid with `overrides` of the form `section.key=value` (value parsed as TOML, else taken as a string).
pub fn load<T: DeserializeOwned + Serialize + Default>(path: Option<&Path>, overrides: &[String]) -> Result<T> {
    let text = match path {
        Some(path) => Some(std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => Error::format(path, "not UTF-8 text; save the config file as UTF-8"),
            _ => Error::io(path, e),
        })?),
        None => None,
    };
    from_text(text.as_deref().zip(path), overrides)
}

/// [`load`] with the config file's contents given: `file` = (TOML text, the path it came from, for errors).
pub fn from_text<T: DeserializeOwned + Serialize + Default>(
    file: Option<(&str, &Path)>,
    overrides: &[String],
) -> Result<T> {
    let path = file.map(|(_, p)| p);
    let mut value = toml::Value::try_from(T::default()).map_err(|e| Error::Config(format!("default config: {e}")))?;
    if let Some((text, path)) = file {
        let file: toml::Value = toml::from_str(text)
            .map_err(|e| Error::format(path, format!("invalid TOML: {}", one_line(&e.to_string()))))?;
        merge(&mut value, file);
    }
    for item in overrides {
        let (key, raw) = item.split_once('=').ok_or_else(|| {
            Error::Config(format!("override '{item}' is not of the form key=value (e.g. train.steps=100)"))
        })?;
        let parsed = parse_value(raw.trim());
        set_path(&mut value, key.trim(), parsed).map_err(|m| Error::Config(format!("override '{item}': {m}")))?;
    }
    let origin = path.map_or("configuration".to_string(), |p| p.display().to_string());
    T::deserialize(value).map_err(|e| Error::Config(format!("{origin}: {}", one_line(&e.to_string()))))
}

/// `cfg` with `overrides` (`section.key=value`, as for [`load`]) applied; unknown keys are errors.
pub fn with_overrides<T: DeserializeOwned + Serialize>(cfg: &T, overrides: &[String]) -> Result<T> {
    let mut value = toml::Value::try_from(cfg).map_err(|e| Error::Config(format!("config: {e}")))?;
    for item in overrides {
        let (key, raw) = item.split_once('=').ok_or_else(|| {
            Error::Config(format!("override '{item}' is not of the form key=value (e.g. lisa.lambda=0.5)"))
        })?;
        set_path(&mut value, key.trim(), parse_value(raw.trim()))
            .map_err(|m| Error::Config(format!("override '{item}': {m}")))?;
    }
    T::deserialize(value).map_err(|e| Error::Config(one_line(&e.to_string())))
}

/// Renders a config as TOML (what `--print-config` shows and runs save beside their outputs).
pub fn to_toml<T: Serialize>(cfg: &T) -> Result<String> {
    toml::to_string_pretty(cfg).map_err(|e| Error::Config(e.to_string()))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn parse_value(raw: &str) -> toml::Value {
    // Parse as a TOML value by wrapping it in a one-key document; bare words become strings.
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

fn set_path(root: &mut toml::Value, key: &str, v: toml::Value) -> std::result::Result<(), String> {
    let mut cur = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let table = cur.as_table_mut().ok_or_else(|| format!("'{}' is not a section", parts[..i].join(".")))?;
        if i + 1 == parts.len() {
            if !table.contains_key(*part) {
                return Err(format!("unknown key '{key}' (see --print-config for the keys)"));
            }
            table.insert((*part).to_owned(), v);
            return Ok(());
        }
        cur = table.get_mut(*part).ok_or_else(|| format!("unknown section '{}'", parts[..=i].join(".")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Inner {
        steps: u64,
        lr: f64,
        name: String,
    }
    impl Default for Inner {
        fn default() -> Self {
            Self { steps: 10, lr: 0.1, name: "a".into() }
        }
    }
    #[derive(Debug, Serialize, Deserialize, PartialEq, Default)]
    #[serde(default, deny_unknown_fields)]
    struct Outer {
        train: Inner,
        seed: u64,
    }

    #[test]
    fn defaults_file_and_overrides_layer() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "seed = 3\n[train]\nlr = 0.5\n").unwrap();
        let c: Outer = load(Some(&f), &["train.steps=7".into(), "train.name=bee".into()]).unwrap();
        assert_eq!(c, Outer { train: Inner { steps: 7, lr: 0.5, name: "bee".into() }, seed: 3 });
    }

    #[test]
    fn unknown_keys_and_bad_files_are_clear_errors() {
        let e = load::<Outer>(None, &["train.stepz=7".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown key 'train.stepz'"), "{e}");
        let e = load::<Outer>(None, &["nonsense".into()]).unwrap_err().to_string();
        assert!(e.contains("key=value"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[train]\nstepz = 1\n").unwrap();
        let e = load::<Outer>(Some(&f), &[]).unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("stepz") && !e.contains('\n'), "{e}");
        std::fs::write(&f, "[train\n").unwrap();
        let e = load::<Outer>(Some(&f), &[]).unwrap_err().to_string();
        assert!(e.contains("invalid TOML") && !e.contains('\n'), "{e}");
    }
}
