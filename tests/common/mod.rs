//! Shared helpers for the integration tests: reading the PyTorch fixtures.
#![allow(dead_code)]

use std::path::PathBuf;

use orwcfm_fast::io::safetensors::{StFile, load};
use orwcfm_fast::nn::{Init, UNetConfig, UNetModel};
use orwcfm_fast::tensor::Tensor;

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A U-Net fixture made by scripts/export_fixtures.py.
pub struct UnetFixture {
    pub file: StFile,
    pub config: UNetConfig,
    pub model: UNetModel,
}

impl UnetFixture {
    pub fn load(name: &str) -> UnetFixture {
        let file = load(&fixture_path(&format!("unet_{name}.safetensors"))).expect("fixture");
        let config = UNetConfig::from_json_str(&file.metadata["unet_config"]).expect("config");
        let mut model = UNetModel::new(&config, Init::Zeros).expect("model");
        let params: Vec<(String, Tensor)> = file.tensors.iter().filter_map(|(n, t)| n.strip_prefix("param.").map(|k| (k.to_string(), t.clone()))).collect();
        model.params_mut().load_strict(params).expect("load params");
        UnetFixture { file, config, model }
    }
    pub fn t(&self, name: &str) -> Tensor {
        self.file.get(name).unwrap_or_else(|| panic!("fixture tensor {name}")).clone()
    }
    pub fn labels(&self) -> Option<Vec<usize>> {
        self.file.get_int("input.y").map(|(_, v)| v.iter().map(|&x| x as usize).collect())
    }
}
