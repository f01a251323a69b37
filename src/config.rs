//! Config files: TOML, layered as built-in defaults ← config file ← `--set key=value` overrides.
//! Unknown keys are errors (a typo must not silently fall back to a default). A file may start from
//! another with a top-level `extends = "other.toml"` (a path relative to the file): the other file's
//! keys first, then its own, so an operating point is written as its differences from a shared base.
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Error, Result};

/// Builds a config of type `T`: its `Default`, overlaid with the TOML file at `path` (if any),
/// overlaid with `overrides` of the form `section.key=value` (value parsed as TOML, else taken as a string).
pub fn load<T: DeserializeOwned + Serialize + Default>(path: Option<&Path>, overrides: &[String]) -> Result<T> {
    load_with_defaults(path, &[], overrides)
}

/// [`load`] with a command's own defaults: `defaults` (overrides in `key=value` form) are applied to
/// `T::default()` before the config file and `overrides`, so both still win over them.
pub fn load_with_defaults<T: DeserializeOwned + Serialize + Default>(
    path: Option<&Path>,
    defaults: &[String],
    overrides: &[String],
) -> Result<T> {
    let text = match path {
        Some(path) => Some(std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => Error::format(path, "not UTF-8 text; save the config file as UTF-8"),
            _ => Error::io(path, e),
        })?),
        None => None,
    };
    from_text_with_defaults(text.as_deref().zip(path), defaults, overrides)
}

/// [`load`] with the config file's contents given: `file` = (TOML text, the path it came from, for errors).
pub fn from_text<T: DeserializeOwned + Serialize + Default>(
    file: Option<(&str, &Path)>,
    overrides: &[String],
) -> Result<T> {
    from_text_with_defaults(file, &[], overrides)
}

fn from_text_with_defaults<T: DeserializeOwned + Serialize + Default>(
    file: Option<(&str, &Path)>,
    command_defaults: &[String],
    overrides: &[String],
) -> Result<T> {
    let path = file.map(|(_, p)| p);
    let defaults = toml::Value::try_from(T::default()).map_err(|e| Error::Config(format!("default config: {e}")))?;
    let mut value = defaults.clone();
    for item in command_defaults {
        apply_override(&mut value, &defaults, item, &mut Vec::new())?;
    }
    if let Some((text, path)) = file {
        merge(&mut value, layered(text, path, &mut Vec::new())?);
    }
    let mut created = Vec::new();
    for item in overrides {
        apply_override(&mut value, &defaults, item, &mut created)?;
    }
    let origin = path.map_or("configuration".to_string(), |p| p.display().to_string());
    T::deserialize(value).map_err(|e| {
        unknown_created_section(&e.to_string(), &created, overrides)
            .unwrap_or_else(|| Error::Config(format!("{origin}: {}", one_line(&e.to_string()))))
    })
}

/// Sets one `key=value` item in `value` (the value parsed as TOML, else taken as a string).
fn apply_override(
    value: &mut toml::Value,
    defaults: &toml::Value,
    item: &str,
    created: &mut Vec<String>,
) -> Result<()> {
    let (key, raw) = item.split_once('=').ok_or_else(|| {
        Error::Config(format!("override '{item}' is not of the form key=value (e.g. train.steps=100)"))
    })?;
    set_path(value, defaults, key.trim(), parse_value(raw.trim()), created)
        .map_err(|m| Error::Config(format!("override '{item}': {m}")))
}

/// When parsing failed on a section that an override created (a misspelt section), the error that
/// names the override, as for a misspelt key.
fn unknown_created_section(err: &str, created: &[String], overrides: &[String]) -> Option<Error> {
    created.iter().find_map(|section| {
        let name = section.rsplit('.').next()?;
        if !err.contains(&format!("unknown field `{name}`")) {
            return None;
        }
        let item = overrides.iter().find(|o| o.trim_start().starts_with(&format!("{section}.")))?;
        Some(Error::Config(format!("override '{item}': unknown section '{section}' (see --print-config for the keys)")))
    })
}

/// `cfg` with `overrides` (`section.key=value`, as for [`load`]) applied; unknown keys are errors.
pub fn with_overrides<T: DeserializeOwned + Serialize>(cfg: &T, overrides: &[String]) -> Result<T> {
    let mut value = toml::Value::try_from(cfg).map_err(|e| Error::Config(format!("config: {e}")))?;
    let defaults = value.clone();
    let mut created = Vec::new();
    for item in overrides {
        let (key, raw) = item.split_once('=').ok_or_else(|| {
            Error::Config(format!("override '{item}' is not of the form key=value (e.g. lisa.lambda=0.5)"))
        })?;
        set_path(&mut value, &defaults, key.trim(), parse_value(raw.trim()), &mut created)
            .map_err(|m| Error::Config(format!("override '{item}': {m}")))?;
    }
    T::deserialize(value).map_err(|e| {
        unknown_created_section(&e.to_string(), &created, overrides)
            .unwrap_or_else(|| Error::Config(one_line(&e.to_string())))
    })
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

/// The key with which a config file names the file it extends.
pub const EXTENDS: &str = "extends";

/// How many files a chain of `extends` may hold.
const MAX_EXTENDS_DEPTH: usize = 8;

/// The TOML `text` of the file at `path`, on top of the file it `extends` (recursively); `chain` holds
/// the files already read, to refuse a cycle.
fn layered(text: &str, path: &Path, chain: &mut Vec<std::path::PathBuf>) -> Result<toml::Value> {
    let mut value: toml::Value = toml::from_str(text)
        .map_err(|e| Error::format(path, format!("invalid TOML: {}", one_line(&e.to_string()))))?;
    let Some(base) = value.as_table_mut().and_then(|t| t.remove(EXTENDS)) else { return Ok(value) };
    let base = base.as_str().ok_or_else(|| {
        Error::format(path, format!("`{EXTENDS}` must be a path to another config file, e.g. {EXTENDS} = \"base.toml\""))
    })?;
    let base_path = path.parent().unwrap_or(Path::new("")).join(base);
    let canonical = base_path.canonicalize().map_err(|e| Error::io(&base_path, e))?;
    chain.push(path.canonicalize().unwrap_or_else(|_| path.to_path_buf()));
    if chain.contains(&canonical) || chain.len() >= MAX_EXTENDS_DEPTH {
        return Err(Error::format(
            path,
            format!("`{EXTENDS}` chain loops or is deeper than {MAX_EXTENDS_DEPTH} files at {}", base_path.display()),
        ));
    }
    let base_text = std::fs::read_to_string(&base_path).map_err(|e| Error::io(&base_path, e))?;
    let mut merged = layered(&base_text, &base_path, chain)?;
    merge(&mut merged, value);
    Ok(merged)
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

/// Sets `key` (dotted) to `v`. Where `defaults` (the config's own defaults) define the section, the key
/// must exist there; a section they leave out (an optional one, such as `data.video`, absent or given
/// only in part by the file) takes any key, and the config's own parsing then rejects what it does not
/// know. Sections created here are added to `created_sections`, for the error message.
fn set_path(
    root: &mut toml::Value,
    defaults: &toml::Value,
    key: &str,
    v: toml::Value,
    created_sections: &mut Vec<String>,
) -> std::result::Result<(), String> {
    let mut cur = root;
    let mut def = Some(defaults);
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let table = cur.as_table_mut().ok_or_else(|| format!("'{}' is not a section", parts[..i].join(".")))?;
        let def_table = def.and_then(toml::Value::as_table);
        if i + 1 == parts.len() {
            if def_table.is_some_and(|d| !d.contains_key(*part)) && !table.contains_key(*part) {
                return Err(format!("unknown key '{key}' (see --print-config for the keys)"));
            }
            table.insert((*part).to_owned(), v);
            return Ok(());
        }
        if !table.contains_key(*part) {
            table.insert((*part).to_owned(), toml::Value::Table(toml::Table::new()));
            created_sections.push(parts[..=i].join("."));
        }
        def = def_table.and_then(|d| d.get(*part));
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
        #[serde(skip_serializing_if = "Option::is_none")]
        extra: Option<Inner>,
    }

    #[test]
    fn defaults_file_and_overrides_layer() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "seed = 3\n[train]\nlr = 0.5\n").unwrap();
        let c: Outer = load(Some(&f), &["train.steps=7".into(), "train.name=bee".into()]).unwrap();
        assert_eq!(c, Outer { train: Inner { steps: 7, lr: 0.5, name: "bee".into() }, seed: 3, extra: None });
    }

    #[test]
    fn overrides_create_optional_sections_and_still_reject_unknown_keys() {
        let c: Outer = load(None, &["extra.steps=4".into(), "extra.lr=0.25".into()]).unwrap();
        assert_eq!(c.extra, Some(Inner { steps: 4, lr: 0.25, ..Inner::default() }));
        assert!(
            load::<Outer>(None, &["seed=1".into(), "train.lrr=1".into()]).is_err(),
            "existing sections stay strict"
        );
        // An optional section given in part by the file takes its other keys from overrides.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[extra]\nlr = 0.5\n").unwrap();
        let c: Outer = load(Some(&f), &["extra.steps=2".into()]).unwrap();
        assert_eq!(c.extra, Some(Inner { steps: 2, lr: 0.5, ..Inner::default() }));
        let e = load::<Outer>(None, &["extra.stepz=4".into()]).unwrap_err().to_string();
        assert!(e.contains("stepz"), "{e}");
        let e = load::<Outer>(None, &["extrra.steps=4".into()]).unwrap_err().to_string();
        assert!(e.contains("override 'extrra.steps=4': unknown section 'extrra'"), "{e}");
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

    #[test]
    fn a_file_extends_another_and_loops_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("base.toml"), "seed = 3\n[train]\nlr = 0.5\nsteps = 20\n").unwrap();
        let f = dir.path().join("sub").join("point.toml");
        std::fs::write(&f, "extends = \"../base.toml\"\n[train]\nlr = 0.25\n").unwrap();
        let c: Outer = load(Some(&f), &["train.name=bee".into()]).unwrap();
        assert_eq!(c, Outer { train: Inner { steps: 20, lr: 0.25, name: "bee".into() }, seed: 3, extra: None });
        // Two levels.
        let g = dir.path().join("sub").join("deeper.toml");
        std::fs::write(&g, "extends = \"point.toml\"\nseed = 9\n").unwrap();
        let c: Outer = load(Some(&g), &[]).unwrap();
        assert_eq!((c.seed, c.train.lr, c.train.steps), (9, 0.25, 20));
        // A loop, a missing base and a non-string are clear errors.
        std::fs::write(dir.path().join("a.toml"), "extends = \"b.toml\"\n").unwrap();
        std::fs::write(dir.path().join("b.toml"), "extends = \"a.toml\"\n").unwrap();
        let e = load::<Outer>(Some(&dir.path().join("a.toml")), &[]).unwrap_err().to_string();
        assert!(e.contains("loops"), "{e}");
        std::fs::write(&f, "extends = \"missing.toml\"\n").unwrap();
        let e = load::<Outer>(Some(&f), &[]).unwrap_err().to_string();
        assert!(e.contains("missing.toml"), "{e}");
        std::fs::write(&f, "extends = 3\n").unwrap();
        let e = load::<Outer>(Some(&f), &[]).unwrap_err().to_string();
        assert!(e.contains("must be a path"), "{e}");
        // A key the base does not know is still refused.
        std::fs::write(&f, "extends = \"../base.toml\"\n[train]\nlrr = 1\n").unwrap();
        assert!(load::<Outer>(Some(&f), &[]).unwrap_err().to_string().contains("lrr"));
    }
}
