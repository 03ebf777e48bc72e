fn main() {
    print!("{}", keygate::api::crds_yaml().expect("crds"));
}
