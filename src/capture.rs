//! Traffic capture: netfilter rules in a pod's network namespace so that the workload's ports
//! answer only through the sidecar. `keygate capture` and `keygate-sidecar capture` run this
//! as the injected init container, before the sidecar and the app start; it needs
//! `NET_ADMIN` (and `NET_RAW`) in the pod, as linkerd-proxy-init and istio-init do.
//!
//! The rules live in their own nftables table, `inet keygate_capture` (IPv4 and IPv6):
//! - chain `inbound` (nat, prerouting): inbound TCP to a captured port is redirected to the
//!   sidecar's port on the address it arrived at. Prerouting sees only packets that enter the
//!   namespace from an interface, so the sidecar's own connection to `127.0.0.1:<app port>`
//!   (and anything else inside the pod) is left alone, with no uid or mark exception.
//! - chain `inbound-other` (filter, input): inbound UDP, SCTP or any other protocol to a
//!   captured port is dropped, so an app that also answers HTTP/3 or another datagram
//!   protocol on its port cannot be reached around the sidecar.
//!
//! The rules are written in one nftables transaction that creates the table and chains if
//! needed, empties the chains and adds the rules: running it again leaves the same rules,
//! and a failure leaves what was there before. Without the privilege to write them the
//! command fails, so the pod does not start: fail closed.

use std::borrow::Cow;
use std::path::PathBuf;

use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, SetItem};
use nftables::schema::{Chain, FlushObject, NfCmd, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{Match, NAT, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

/// The nftables table that holds keygate's rules.
pub const TABLE: &str = "keygate_capture";
/// The chain that redirects inbound TCP to the sidecar.
pub const REDIRECT_CHAIN: &str = "inbound";
/// The chain that drops inbound non-TCP traffic to the captured ports.
pub const DROP_CHAIN: &str = "inbound-other";

/// Priority of the nat chain: `dstnat` (-100), where DNAT and redirect belong.
const DSTNAT_PRIORITY: i32 = -100;
/// Priority of the filter chain: `filter` (0).
const FILTER_PRIORITY: i32 = 0;

/// `keygate capture`: install the rules in the current network namespace.
#[derive(clap::Args, Debug)]
pub struct CaptureArgs {
    /// The workload's ports whose inbound traffic must go through the sidecar
    /// (comma-separated or repeated).
    #[arg(
        long,
        env = "KEYGATE_CAPTURE_PORTS",
        value_delimiter = ',',
        required = true
    )]
    pub ports: Vec<u16>,
    /// The sidecar's listen port, where inbound TCP to those ports is redirected.
    #[arg(long, env = "KEYGATE_CAPTURE_TO")]
    pub to: u16,
    /// The nft executable.
    #[arg(long, env = "KEYGATE_NFT", default_value = "nft")]
    pub nft: PathBuf,
    /// Print the nftables JSON instead of installing it.
    #[arg(long, env = "KEYGATE_CAPTURE_DRY_RUN", default_value_t = false)]
    pub dry_run: bool,
}

/// Why the rules cannot be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("no port to capture; give the workload's ports with --ports")]
    NoPorts,
    #[error("port 0 cannot be captured or redirected to; use ports from 1 to 65535")]
    PortZero,
    #[error(
        "port {0} is both captured and the sidecar's port: redirecting it to itself would loop; capture only the workload's ports"
    )]
    Loop(u16),
    #[error(
        "installing the capture rules with {program} failed: {source} (the container needs the NET_ADMIN capability and the nft program)"
    )]
    Install {
        program: String,
        #[source]
        source: nftables::helper::NftablesError,
    },
}

/// The nftables transaction that (re)writes the capture rules: inbound TCP to `ports` is
/// redirected to `to`, anything else to `ports` is dropped. Pure; [`install`] runs it.
pub fn ruleset(ports: &[u16], to: u16) -> Result<Nftables<'static>, CaptureError> {
    if ports.is_empty() {
        return Err(CaptureError::NoPorts);
    }
    if to == 0 || ports.contains(&0) {
        return Err(CaptureError::PortZero);
    }
    if ports.contains(&to) {
        return Err(CaptureError::Loop(to));
    }
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();

    let family = NfFamily::INet;
    let table = || Cow::Borrowed(TABLE);
    let chain = |name: &'static str, kind: NfChainType, hook: NfHook, prio: i32| Chain {
        family,
        table: table(),
        name: name.into(),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    };
    let redirect = chain(
        REDIRECT_CHAIN,
        NfChainType::NAT,
        NfHook::Prerouting,
        DSTNAT_PRIORITY,
    );
    let drop = chain(
        DROP_CHAIN,
        NfChainType::Filter,
        NfHook::Input,
        FILTER_PRIORITY,
    );

    let port_set = Expression::Named(NamedExpression::Set(
        ports
            .iter()
            .map(|p| SetItem::Element(Expression::Number(u32::from(*p))))
            .collect(),
    ));
    // `th dport`: the destination port of any transport header (TCP, UDP, SCTP, ...).
    let dport = |protocol: &'static str| {
        Expression::Named(NamedExpression::Payload(Payload::PayloadField(
            PayloadField {
                protocol: protocol.into(),
                field: "dport".into(),
            },
        )))
    };
    let l4proto = || {
        Expression::Named(NamedExpression::Meta(Meta {
            key: MetaKey::L4proto,
        }))
    };
    let matches = |left: Expression<'static>, op: Operator, right: Expression<'static>| {
        Statement::Match(Match { left, right, op })
    };
    let rule = |chain: &'static str, expr: Vec<Statement<'static>>, comment: &'static str| Rule {
        family,
        table: table(),
        chain: chain.into(),
        expr: expr.into(),
        comment: Some(comment.into()),
        ..Rule::default()
    };

    let mut batch = Batch::new();
    batch.add(NfListObject::Table(Table {
        family,
        name: table(),
        handle: None,
    }));
    for chain in [redirect.clone(), drop.clone()] {
        batch.add(NfListObject::Chain(chain.clone()));
        batch.add_cmd(NfCmd::Flush(FlushObject::Chain(chain)));
    }
    batch.add(NfListObject::Rule(rule(
        REDIRECT_CHAIN,
        vec![
            matches(l4proto(), Operator::EQ, Expression::String("tcp".into())),
            matches(dport("tcp"), Operator::EQ, port_set.clone()),
            Statement::Redirect(Some(NAT {
                addr: None,
                family: None,
                port: Some(Expression::Number(u32::from(to))),
                flags: None,
            })),
        ],
        "keygate: inbound TCP to the workload goes through the sidecar",
    )));
    batch.add(NfListObject::Rule(rule(
        DROP_CHAIN,
        vec![
            matches(l4proto(), Operator::NEQ, Expression::String("tcp".into())),
            matches(dport("th"), Operator::EQ, port_set),
            Statement::Drop(None),
        ],
        "keygate: no other protocol reaches the workload's ports",
    )));
    Ok(batch.to_nftables())
}

/// Installs the rules with the `nft` program at `program`.
pub fn install(ruleset: &Nftables<'_>, program: &std::path::Path) -> Result<(), CaptureError> {
    let no_args: [&str; 0] = [];
    nftables::helper::apply_ruleset_with_args(ruleset, Some(program), no_args).map_err(|source| {
        CaptureError::Install {
            program: program.display().to_string(),
            source,
        }
    })
}

/// Runs `keygate capture`.
pub fn run(args: &CaptureArgs) -> anyhow::Result<()> {
    let ruleset = ruleset(&args.ports, args.to)?;
    if args.dry_run {
        println!("{}", serde_json::to_string_pretty(&ruleset)?);
        return Ok(());
    }
    install(&ruleset, &args.nft)?;
    tracing::info!(ports = ?args.ports, to = args.to, table = TABLE, "inbound traffic to the workload now goes through the sidecar");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn json_of(ports: &[u16], to: u16) -> Value {
        serde_json::to_value(ruleset(ports, to).unwrap()).unwrap()
    }

    #[test]
    fn one_transaction_that_rewrites_the_table() {
        let value = json_of(&[9090, 8080, 9090], 8100);
        let commands: Vec<&str> = value["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_object().unwrap().keys().next().unwrap().as_str())
            .collect();
        // Table and chains are added if missing and emptied before the rules go in, so a
        // second run leaves exactly the same rules.
        assert_eq!(
            commands,
            ["add", "add", "flush", "add", "flush", "add", "add"]
        );
        let text = value.to_string();
        assert!(text.contains(r#""redirect":{"port":8100}"#), "{text}");
        assert!(
            text.contains(r#""set":[8080,9090]"#),
            "ports sorted, once: {text}"
        );
        assert!(text.contains(r#""hook":"prerouting""#), "{text}");
        assert!(text.contains(r#""drop":null"#), "{text}");
    }

    #[test]
    fn refuses_what_would_loop_or_capture_nothing() {
        assert!(matches!(ruleset(&[], 8100), Err(CaptureError::NoPorts)));
        assert!(matches!(
            ruleset(&[8100, 9090], 8100),
            Err(CaptureError::Loop(8100))
        ));
        assert!(matches!(ruleset(&[0], 8100), Err(CaptureError::PortZero)));
        assert!(matches!(ruleset(&[9090], 0), Err(CaptureError::PortZero)));
    }
}
