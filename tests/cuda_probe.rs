//! The CUDA libraries are loaded at run time: without a driver or GPU every CUDA request is one
//! clear error line (cudarc would panic), and `devices` reports what the machine has.

use std::process::Command;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_orwcfm-fast")).args(args).env_remove("ORWCFM_CUDA_LIB_DIRS").output().unwrap()
}

#[test]
fn device_cuda_is_one_clear_error_and_devices_reports_the_machine() {
    let o = run(&["devices", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let j: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let driver = j["driver"].as_bool().unwrap();
    let o = run(&["sample", "-n", "2", "--steps", "1", "--grid", "/tmp/never-written.png", "--device", "cuda"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert_eq!(e.lines().count(), 1, "one line, no panic: {e}");
    if driver {
        eprintln!("an NVIDIA driver is present: checking the message names the device");
        let devs = j["devices"].as_array().unwrap();
        assert!(devs.is_empty() && e.contains("no usable GPU") || !devs.is_empty() && e.contains(devs[0]["name"].as_str().unwrap()), "{e}");
    } else {
        assert!(j["devices"].as_array().unwrap().is_empty());
        assert!(e.starts_with("error:") && e.contains("libcuda.so") && e.contains("--device cpu"), "{e}");
    }
    let o = run(&["train", "--device", "cuda:3", "--quiet"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cuda:3"));
}
