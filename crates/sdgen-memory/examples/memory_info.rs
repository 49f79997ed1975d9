//! Prints this process's memory line, the snapshot as JSON, and whether exact stage peaks are
//! available: `cargo run -p sdgen-memory --example memory_info`.

fn main() {
    let info = sdgen_memory::log_memory_status("Startup");
    println!("{}", serde_json::to_string_pretty(&info).expect("MemoryInfo serialises"));
    println!("kernel_peak_supported: {}", sdgen_memory::kernel_peak_supported());
}
