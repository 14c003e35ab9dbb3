//! A Burn module's float parameters as Ringlet sees them: named by module path, in visit order
//! (the order of the fields, which for models written top to bottom is forward order), copied to
//! and from flat host vectors.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Tensor, TensorData};
use ringlet::Error;
use ringlet_ddp::checkpoint::Tensor as NamedTensor;
use std::collections::HashMap;

/// One float parameter of a module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamInfo {
    pub id: ParamId,
    /// Module path, e.g. `conv1.weight` or `blocks.0.attention.query.weight`.
    pub name: String,
    pub shape: Vec<usize>,
}

impl ParamInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The float parameters of `module` that train (require a gradient), in visit order.
pub fn list<M: Module>(module: &M) -> Vec<ParamInfo> {
    let mut v = Lister::default();
    module.visit(&mut v);
    v.out
}

#[derive(Default)]
struct Lister {
    path: Vec<String>,
    out: Vec<ParamInfo>,
}

/// A path component; tuples and vectors give indices, as in PyTorch's state dicts.
fn join(path: &[String], leaf: &str) -> String {
    let mut s = path.join(".");
    if !s.is_empty() {
        s.push('.');
    }
    s.push_str(leaf);
    s
}

impl ModuleVisitor for Lister {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !param.is_require_grad() {
            return;
        }
        // The leaf's own name is the last component entered (the field), if any.
        let name = match self.path.split_last() {
            Some((leaf, parents)) => join(parents, leaf),
            None => format!("param{}", self.out.len()),
        };
        self.out.push(ParamInfo {
            id: param.id,
            name,
            shape: param.lazy_shape().to_vec(),
        });
    }
}

/// A tensor's values as host f32 (any float dtype is converted).
pub fn to_host<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, Error> {
    let data = t
        .try_into_data()
        .map_err(|e| Error::Device(format!("reading a tensor: {e:?}")))?;
    let data = data.convert::<f32>();
    data.as_slice::<f32>()
        .map(<[f32]>::to_vec)
        .map_err(|e| Error::Device(format!("reading a tensor: {e:?}")))
}

/// Every listed parameter's values, flattened in list order.
pub fn flatten<M: Module>(module: &M, params: &[ParamInfo]) -> Result<Vec<f32>, Error> {
    let mut by_id = read(module, params)?;
    let mut flat = Vec::with_capacity(params.iter().map(ParamInfo::numel).sum());
    for p in params {
        flat.extend(by_id.remove(&p.id).unwrap_or_default());
    }
    Ok(flat)
}

/// The listed parameters' values by id.
fn read<M: Module>(module: &M, params: &[ParamInfo]) -> Result<HashMap<ParamId, Vec<f32>>, Error> {
    struct Reader<'a> {
        want: &'a HashMap<ParamId, usize>,
        out: HashMap<ParamId, Vec<f32>>,
        error: Option<Error>,
    }
    impl ModuleVisitor for Reader<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.error.is_some() || !self.want.contains_key(&param.id) {
                return;
            }
            match to_host(param.val()) {
                Ok(v) => {
                    self.out.insert(param.id, v);
                }
                Err(e) => self.error = Some(e),
            }
        }
    }
    let want: HashMap<ParamId, usize> = params.iter().enumerate().map(|(i, p)| (p.id, i)).collect();
    let mut r = Reader {
        want: &want,
        out: HashMap::new(),
        error: None,
    };
    module.visit(&mut r);
    match r.error {
        Some(e) => Err(e),
        None if r.out.len() != params.len() => Err(Error::InvalidArgument(format!(
            "the module has {} of the {} parameters described (a different model?)",
            r.out.len(),
            params.len()
        ))),
        None => Ok(r.out),
    }
}

/// Replaces the listed parameters' values with `flat` (list order), keeping each parameter's
/// id, device and whether it requires a gradient.
pub fn unflatten<M: Module>(module: M, params: &[ParamInfo], flat: &[f32]) -> Result<M, Error> {
    let total: usize = params.iter().map(ParamInfo::numel).sum();
    if flat.len() != total {
        return Err(Error::InvalidArgument(format!(
            "{} values for parameters of {total} elements",
            flat.len()
        )));
    }
    let mut values = HashMap::new();
    let mut at = 0;
    for p in params {
        values.insert(p.id, (&flat[at..at + p.numel()], p.shape.clone()));
        at += p.numel();
    }
    struct Writer<'a> {
        values: HashMap<ParamId, (&'a [f32], Vec<usize>)>,
    }
    impl ModuleMapper for Writer<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let Some((v, shape)) = self.values.remove(&param.id) else {
                return param;
            };
            param.map(|t| {
                let (device, grad) = (t.device(), t.is_require_grad());
                let fresh = Tensor::<D>::from_data(TensorData::new(v.to_vec(), shape), &device);
                fresh.set_require_grad(grad)
            })
        }
    }
    Ok(module.map(&mut Writer { values }))
}

/// The parameters as named tensors (for a checkpoint).
pub fn named_tensors<M: Module>(
    module: &M,
    params: &[ParamInfo],
) -> Result<Vec<NamedTensor>, Error> {
    let mut by_id = read(module, params)?;
    Ok(params
        .iter()
        .map(|p| NamedTensor {
            name: p.name.clone(),
            shape: p.shape.clone(),
            data: by_id.remove(&p.id).unwrap_or_default(),
        })
        .collect())
}

/// Loads named tensors (from a checkpoint) into the listed parameters; every parameter must be
/// there with its shape.
pub fn load_named<M: Module>(
    module: M,
    params: &[ParamInfo],
    tensors: &[NamedTensor],
    what: &str,
) -> Result<M, Error> {
    let by_name: HashMap<&str, &NamedTensor> =
        tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut flat = Vec::new();
    for p in params {
        let t = by_name
            .get(p.name.as_str())
            .ok_or_else(|| Error::Config(format!("{what} has no tensor {:?}", p.name)))?;
        if t.shape != p.shape || t.data.len() != p.numel() {
            return Err(Error::Config(format!(
                "{what}: {} has shape {:?}, the model needs {:?}",
                p.name, t.shape, p.shape
            )));
        }
        flat.extend_from_slice(&t.data);
    }
    unflatten(module, params, &flat)
}
