//! Writes every test payload into the directory given as the only argument.

use std::{env, fs, path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let Some(dir) = env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: rkvm-payloads DIR");
        return ExitCode::from(2);
    };
    if let Err(e) = fs::create_dir_all(&dir) {
        eprintln!("rkvm-payloads: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for p in rkvm_payloads::all() {
        let path = dir.join(p.name);
        if let Err(e) = fs::write(&path, &p.image) {
            eprintln!("rkvm-payloads: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
