//! What the trainer needs of a model: a velocity field `v(t, x[, y])` with named parameters that
//! can be saved and loaded. The U-Net and the toy MLP both implement it.

use std::path::Path;

use anyhow::Result;

use super::params::ParamStore;
use super::unet::{Forward, UNetModel};
use crate::autograd::{Var, no_grad};
use crate::tensor::{DType, Tensor};

/// A (possibly class-conditional) velocity field with trainable parameters.
///
/// `Clone` must give an independent copy of the parameters (cheap copy-on-write is fine): the
/// trainer keeps `net`, `last_policy` and `ref` as clones of one another.
pub trait VelocityField: Clone {
    /// Shape of one sample, without the batch axis (`[C, H, W]` for the U-Net, `[D]` for the MLP).
    fn sample_shape(&self) -> Vec<usize>;
    /// Number of classes for a class-conditional model.
    fn num_classes(&self) -> Option<usize>;
    /// `v(t, x, y)` with `t` of shape `[B]` (or a scalar) on the tape.
    fn forward(&self, t: &Var, x: &Var, y: Option<&[usize]>, fw: &mut Forward) -> Result<Var>;
    fn params(&self) -> &ParamStore;
    fn params_mut(&mut self) -> &mut ParamStore;
    /// Save the weights with their architecture (safetensors, names as in PyTorch).
    fn save_file(&self, path: &Path) -> Result<()>;
    /// Load weights saved by [`VelocityField::save_file`] (or, for the U-Net, any torchcfm
    /// checkpoint; `key` picks the entry of a `.pt` file).
    fn load_file(path: &Path, key: Option<&str>) -> Result<Self>;

    /// Inference: no tape, no dropout.
    fn predict(&self, t: &Tensor, x: &Tensor, y: Option<&[usize]>) -> Result<Tensor> {
        no_grad(|| {
            let v = self.forward(&Var::constant(t.clone()), &Var::constant(x.clone()), y, &mut Forward { dropout_rng: None })?;
            Ok(v.value())
        })
    }
    /// Where the parameters are.
    fn device(&self) -> crate::tensor::Device {
        self.params().device()
    }
    /// Move the parameters to `device`; inputs given on the CPU are then uploaded by the ops.
    fn to_device(&mut self, device: crate::tensor::Device) -> Result<()> {
        self.params_mut().to_device(device)
    }
    /// Store the parameters in `dtype` (f32, f16 or bf16): the forward pass then runs in that
    /// precision (inputs cast at entry, the velocity returned in f32).
    fn to_precision(&mut self, dtype: DType) -> Result<()> {
        self.params_mut().to_dtype(dtype)
    }
    /// The dtype the parameters are stored in.
    fn precision(&self) -> DType {
        self.params().dtype()
    }
    /// Copy every parameter value of `other` (same architecture) into `self`.
    fn copy_from(&mut self, other: &Self) {
        self.params().set_all(other.params().vars().iter().map(|v| v.value()).collect());
    }
}

impl VelocityField for UNetModel {
    fn sample_shape(&self) -> Vec<usize> {
        let c = self.config();
        vec![c.dim[0], c.dim[1], c.dim[2]]
    }
    fn num_classes(&self) -> Option<usize> {
        let c = self.config();
        c.class_cond.then_some(c.num_classes)
    }
    fn forward(&self, t: &Var, x: &Var, y: Option<&[usize]>, fw: &mut Forward) -> Result<Var> {
        UNetModel::forward(self, t, x, y, fw)
    }
    fn params(&self) -> &ParamStore {
        UNetModel::params(self)
    }
    fn params_mut(&mut self) -> &mut ParamStore {
        UNetModel::params_mut(self)
    }
    fn save_file(&self, path: &Path) -> Result<()> {
        super::load::save_model(self, path, DType::F32)
    }
    fn load_file(path: &Path, key: Option<&str>) -> Result<Self> {
        Ok(super::load::load_model(path, None, key)?.model)
    }
}
