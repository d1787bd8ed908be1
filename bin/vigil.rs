//! `vigil`: the operator CLI. See `vigil::tools::cli`.

fn main() -> std::process::ExitCode {
    vigil::tools::cli::main()
}
