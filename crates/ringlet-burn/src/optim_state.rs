//! A Burn optimizer's state as named f32 tensors (and a few scalars), for checkpoints that
//! outlive the process.
//!
//! Burn keys optimizer state by [`ParamId`](burn::module::ParamId), a number that differs every
//! time a model is built; a checkpoint must survive that. Each state tensor `"{id}.{field}"` of
//! Burn's record is saved as `"{parameter name}.{field}"` (e.g. `conv1.weight.momentum.velocity`),
//! and mapped back to the new run's ids on load.

use crate::params::ParamInfo;
use burn::optim::{ModuleOptimizer, OptimizerRecord};
use burn::tensor::{DType, TensorData};
use burn_pack::{Reader, Scalar, Writer};
use ringlet::Error;
use ringlet_ddp::checkpoint::Tensor as NamedTensor;
use serde_json::{json, Map, Value};
use std::collections::HashMap;

fn bad(what: impl std::fmt::Display) -> Error {
    Error::Config(format!("optimizer state: {what}"))
}

/// Splits `"{id}.{rest}"` and renames the id through `map`.
fn rename(key: &str, map: &HashMap<String, String>) -> Option<String> {
    let (id, rest) = key
        .split_once('.')
        .map_or((key, None), |(a, b)| (a, Some(b)));
    let to = map.get(id)?;
    Some(match rest {
        Some(r) => format!("{to}.{r}"),
        None => to.clone(),
    })
}

/// Splits `"{parameter name}.{rest}"` (parameter names contain dots: the longest known name
/// that fits wins) and renames the name through `map`.
fn rename_back(key: &str, names: &[(&str, String)]) -> Option<String> {
    names
        .iter()
        .filter(|(name, _)| {
            key == *name || key.strip_prefix(name).is_some_and(|r| r.starts_with('.'))
        })
        .max_by_key(|(name, _)| name.len())
        .map(|(name, id)| format!("{id}{}", &key[name.len()..]))
}

fn scalar_to_json(s: &Scalar) -> Value {
    match *s {
        Scalar::Int(v) => json!({ "int": v }),
        Scalar::UInt(v) => json!({ "uint": v }),
        Scalar::Float(v) => json!({ "float": v }),
        Scalar::Bool(v) => json!({ "bool": v }),
    }
}

fn scalar_from_json(v: &Value) -> Option<Scalar> {
    let (kind, value) = v.as_object()?.iter().next()?;
    Some(match kind.as_str() {
        "int" => Scalar::Int(value.as_i64()?),
        "uint" => Scalar::UInt(value.as_u64()?),
        "float" => Scalar::Float(value.as_f64()?),
        "bool" => Scalar::Bool(value.as_bool()?),
        _ => return None,
    })
}

/// The optimizer's state: named tensors (`{parameter}.{field}`), and a JSON object of its
/// scalars (step counts, each state's rank) and group paths.
pub fn save(
    optim: &ModuleOptimizer,
    params: &[ParamInfo],
) -> Result<(Vec<NamedTensor>, Value), Error> {
    let names: HashMap<String, String> = params
        .iter()
        .map(|p| (p.id.val().to_string(), p.name.clone()))
        .collect();
    let bytes = optim
        .to_record()
        .into_bytes()
        .map_err(|e| bad(format!("{e:?}")))?;
    let reader = Reader::from_bytes(bytes).map_err(|e| bad(format!("{e:?}")))?;
    let mut scalars = Map::new();
    for (k, v) in reader.scalars() {
        let k = rename(k, &names).ok_or_else(|| bad(format!("scalar {k} of no parameter")))?;
        scalars.insert(k, scalar_to_json(v));
    }
    let mut paths = Map::new();
    for (k, v) in reader.metadata() {
        if let Some(k) = rename(k, &names) {
            paths.insert(k, Value::String(v.clone()));
        }
    }
    let mut tensors = Vec::new();
    for t in reader.into_tensors().map_err(|e| bad(format!("{e:?}")))? {
        let (name, dtype, shape, _id, bytes) = t.into_parts().map_err(|e| bad(format!("{e:?}")))?;
        let name =
            rename(&name, &names).ok_or_else(|| bad(format!("tensor {name} of no parameter")))?;
        let data = TensorData::from_bytes(bytes, shape.clone(), dtype).convert::<f32>();
        let values = data
            .as_slice::<f32>()
            .map_err(|e| bad(format!("{name}: {e:?}")))?
            .to_vec();
        tensors.push(NamedTensor {
            name,
            shape: shape.to_vec(),
            data: values,
        });
    }
    // Burn keeps the state in a hash map: sorted, a checkpoint's files do not depend on it.
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((tensors, json!({ "scalars": scalars, "paths": paths })))
}

/// The parameter a state entry `"{parameter name}.{field}"` belongs to (names contain dots: the
/// longest that fits).
fn owner<'a>(key: &str, params: &'a [ParamInfo]) -> Option<&'a ParamInfo> {
    params
        .iter()
        .filter(|p| {
            key.strip_prefix(p.name.as_str())
                .is_some_and(|r| r.starts_with('.'))
        })
        .max_by_key(|p| p.name.len())
}

/// `optim` with the state [`save`] produced, mapped onto this run's parameters. Every state
/// tensor must have its parameter's shape, as the state of SGD (momentum), Adam and AdamW does.
pub fn load(
    optim: ModuleOptimizer,
    params: &[ParamInfo],
    tensors: &[NamedTensor],
    extra: &Value,
) -> Result<ModuleOptimizer, Error> {
    let names: Vec<(&str, String)> = params
        .iter()
        .map(|p| (p.name.as_str(), p.id.val().to_string()))
        .collect();
    let mut packed = Vec::with_capacity(tensors.len());
    for t in tensors {
        let p = owner(&t.name, params)
            .ok_or_else(|| bad(format!("{} belongs to no parameter of this model", t.name)))?;
        // SGD's velocity and Adam's moments have their parameter's shape; anything else (an
        // edited file) must not reach Burn's loader, which cannot refuse it.
        if t.shape != p.shape || t.data.len() != p.numel() {
            return Err(bad(format!(
                "{} has shape {:?}, its parameter {} has {:?}",
                t.name, t.shape, p.name, p.shape
            )));
        }
        let key = format!("{}{}", p.id.val(), &t.name[p.name.len()..]);
        let bytes = TensorData::new(t.data.clone(), t.shape.clone()).into_bytes();
        packed.push(burn_pack::Tensor::new(
            key,
            DType::F32,
            t.shape.clone(),
            Some(p.id.val()),
            bytes,
        ));
    }
    let mut writer = Writer::new(packed);
    let empty = Map::new();
    let scalars = extra
        .get("scalars")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    for (k, v) in scalars {
        let key =
            rename_back(k, &names).ok_or_else(|| bad(format!("scalar {k} of no parameter")))?;
        let s = scalar_from_json(v).ok_or_else(|| bad(format!("scalar {k} is {v}")))?;
        writer = writer.with_scalar(&key, s);
    }
    let paths = extra
        .get("paths")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    for (k, v) in paths {
        if let (Some(key), Some(v)) = (rename_back(k, &names), v.as_str()) {
            writer = writer.with_metadata(&key, v);
        }
    }
    let bytes = writer.into_bytes().map_err(|e| bad(format!("{e:?}")))?;
    let record = OptimizerRecord::from_bytes(bytes).map_err(|e| bad(format!("{e:?}")))?;
    Ok(optim.load_record(record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways_with_dotted_parameter_names() {
        let ids: HashMap<String, String> =
            [("17".to_string(), "blocks.0.fc.weight".to_string())].into();
        assert_eq!(
            rename("17.momentum.velocity", &ids).as_deref(),
            Some("blocks.0.fc.weight.momentum.velocity")
        );
        assert_eq!(rename("18.x", &ids), None);
        let names = [
            ("blocks.0.fc", "5".to_string()),
            ("blocks.0.fc.weight", "9".to_string()),
        ];
        assert_eq!(
            rename_back("blocks.0.fc.weight.momentum.velocity", &names).as_deref(),
            Some("9.momentum.velocity")
        );
        assert_eq!(
            rename_back("blocks.0.fc.bias", &names).as_deref(),
            Some("5.bias")
        );
        assert_eq!(rename_back("blocks.0.fcx", &names), None);
        for s in [
            Scalar::Int(-3),
            Scalar::UInt(7),
            Scalar::Float(0.5),
            Scalar::Bool(true),
        ] {
            let back = scalar_from_json(&scalar_to_json(&s)).unwrap();
            assert_eq!(format!("{back:?}"), format!("{s:?}"));
        }
    }
}
