//! Every key path the recipe schema accepts, read off serde's own field lists, so the recipe
//! reference (docs/recipes.md) is checked against the schema and cannot drift from it.
//!
//! A probing deserializer walks [`Recipe`]: asked for a struct at the path it is exploring, it notes
//! the struct's fields (serde hands them to `deserialize_struct`) and stops; on the way there it feeds
//! one key per level, looks through `Option`s and newtypes, and enters lists as `[]`. Every other value
//! (numbers, strings, enums, maps, custom forms such as `activation_checkpointing`) is a leaf.

use std::cell::RefCell;
use std::collections::{BTreeSet, VecDeque};

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::Recipe;

/// Every key of the schema, dotted (`model.preset`, `data.sources[].path`), sections included.
pub fn schema_keys() -> Vec<String> {
    let mut keys = BTreeSet::new();
    let mut queue: VecDeque<Vec<&'static str>> = VecDeque::from([vec![]]);
    while let Some(path) = queue.pop_front() {
        let found = RefCell::new(None);
        let _ = Recipe::deserialize(Probe { plan: &path, depth: 0, found: &found });
        for f in found.into_inner().unwrap_or_default() {
            let mut p = path.clone();
            p.push(f);
            if f != "[]" {
                keys.insert(join(&p));
            }
            queue.push_back(p);
        }
    }
    keys.into_iter().collect()
}

fn join(p: &[&str]) -> String {
    let mut s = String::new();
    for part in p {
        if *part == "[]" {
            s.push_str("[]");
        } else {
            if !s.is_empty() {
                s.push('.');
            }
            s.push_str(part);
        }
    }
    s
}

#[derive(Debug)]
struct Stop;

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("probe stop")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Stop
    }
}

/// Explores `plan`: at depth `plan.len()` it notes what is there (a struct's fields, or `[]` for a
/// list) in `found`.
struct Probe<'a> {
    plan: &'a [&'static str],
    depth: usize,
    found: &'a RefCell<Option<Vec<&'static str>>>,
}

impl<'a> Probe<'a> {
    fn deeper(&self) -> Self {
        Probe { plan: self.plan, depth: self.depth + 1, found: self.found }
    }

    fn at_target(&self) -> bool {
        self.depth == self.plan.len()
    }
}

impl<'de, 'a> de::Deserializer<'de> for Probe<'a> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Stop> {
        if self.at_target() {
            *self.found.borrow_mut() = Some(fields.to_vec());
            return Err(Stop);
        }
        let key = self.plan[self.depth];
        if !fields.contains(&key) {
            return Err(Stop);
        }
        visitor.visit_map(OneKey { key: Some(key), value: Some(self.deeper()) })
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        if self.at_target() {
            *self.found.borrow_mut() = Some(vec!["[]"]);
            return Err(Stop);
        }
        if self.plan[self.depth] != "[]" {
            return Err(Stop);
        }
        visitor.visit_seq(OneElement(Some(self.deeper())))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct tuple tuple_struct map enum identifier ignored_any
    }
}

struct OneKey<'a> {
    key: Option<&'static str>,
    value: Option<Probe<'a>>,
}

impl<'de, 'a> MapAccess<'de> for OneKey<'a> {
    type Error = Stop;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Stop> {
        match self.key.take() {
            Some(k) => seed.deserialize(k.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Stop> {
        seed.deserialize(self.value.take().ok_or(Stop)?)
    }
}

struct OneElement<'a>(Option<Probe<'a>>);

impl<'de, 'a> SeqAccess<'de> for OneElement<'a> {
    type Error = Stop;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Stop> {
        match self.0.take() {
            Some(p) => seed.deserialize(p).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_probe_finds_nested_sections_lists_and_options() {
        let keys = super::schema_keys();
        for k in ["model", "model.preset", "data.sources", "data.sources[].path", "eval.judge.url", "lora.r", "logging.trace.step"] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
    }

    /// docs/recipes.md lists every key of the schema, and no key the schema does not accept.
    #[test]
    fn the_recipe_reference_lists_every_key_of_the_schema() {
        let doc_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/recipes.md");
        let doc = std::fs::read_to_string(doc_path).expect("docs/recipes.md");
        // A key is documented as a table row whose first cell is the key in backticks.
        let documented: std::collections::BTreeSet<String> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split_once('`').map(|(k, _)| k.to_string()))
            .collect();
        let schema: std::collections::BTreeSet<String> = super::schema_keys().into_iter().collect();
        let missing: Vec<&String> = schema.difference(&documented).collect();
        let unknown: Vec<&String> = documented.difference(&schema).collect();
        assert!(
            missing.is_empty() && unknown.is_empty(),
            "docs/recipes.md is out of step with the recipe schema (idavlm-worker recipe-keys prints it):\n  \
             keys not documented: {missing:?}\n  documented keys the schema does not accept: {unknown:?}"
        );
    }
}
