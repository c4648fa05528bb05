//! torchrun's environment: which rank this process is, how many there are, and where the
//! rendezvous store listens.

use crate::{Error, Result};

/// A process's place in a multi-process run, as torchrun (or a user) sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// This process, `0..world_size` (`RANK`).
    pub rank: i64,
    /// How many processes (`WORLD_SIZE`).
    pub world_size: i64,
    /// This process on its machine (`LOCAL_RANK`, default the rank).
    pub local_rank: i64,
    /// The rendezvous store's host (`MASTER_ADDR`).
    pub master_addr: String,
    /// Its port (`MASTER_PORT`).
    pub master_port: u16,
    /// Whether torchrun's agent already hosts the store (`TORCHELASTIC_USE_AGENT_STORE`):
    /// then every rank is a client; otherwise rank 0 hosts it.
    pub agent_store: bool,
    /// torchrun's restart count (`TORCHELASTIC_RESTART_COUNT`), which keys the rendezvous.
    pub restart: i64,
}

impl DistEnv {
    /// The run described by the process's environment; `None` when `WORLD_SIZE` is unset
    /// (a single process).
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The run described by `get` (a variable's value, if set); see [`from_env`](Self::from_env).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(world) = get("WORLD_SIZE") else { return Ok(None) };
        // Some schedulers export WORLD_SIZE=1 alone: one process, nothing to join.
        if world.trim() == "1" && get("RANK").is_none() && get("MASTER_PORT").is_none() {
            return Ok(None);
        }
        let int = |name: &'static str, value: String, min: i64| -> Result<i64> {
            match value.trim().parse::<i64>() {
                Ok(v) if v >= min => Ok(v),
                Ok(_) => Err(Error::DistEnv { name, value, problem: "is out of range" }),
                Err(_) => Err(Error::DistEnv { name, value, problem: "is not a whole number" }),
            }
        };
        let world_size = int("WORLD_SIZE", world, 1)?;
        let need = |name: &'static str| {
            get(name).ok_or(Error::DistEnv {
                name,
                value: String::new(),
                problem: "must be set when WORLD_SIZE is",
            })
        };
        let rank = int("RANK", need("RANK")?, 0)?;
        if rank >= world_size {
            return Err(Error::DistEnv {
                name: "RANK",
                value: rank.to_string(),
                problem: "must be less than WORLD_SIZE",
            });
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(v) => int("LOCAL_RANK", v, 0)?,
            None => rank,
        };
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        if master_addr.is_empty() || master_addr.contains('\0') {
            return Err(Error::DistEnv {
                name: "MASTER_ADDR",
                value: master_addr,
                problem: "is not a host name",
            });
        }
        let port = need("MASTER_PORT")?;
        let master_port = match port.trim().parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(Error::DistEnv {
                    name: "MASTER_PORT",
                    value: port,
                    problem: "is not a port (1 to 65535)",
                })
            }
        };
        let agent_store =
            get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        let restart = match get("TORCHELASTIC_RESTART_COUNT") {
            Some(v) => int("TORCHELASTIC_RESTART_COUNT", v, 0)?,
            None => 0,
        };
        Ok(Some(Self { rank, world_size, local_rank, master_addr, master_port, agent_store, restart }))
    }
}

#[cfg(test)]
mod tests {
    use super::DistEnv;

    fn env(vars: &[(&str, &str)]) -> crate::Result<Option<DistEnv>> {
        DistEnv::from_vars(|n| vars.iter().find(|(k, _)| *k == n).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn torchruns_variables_are_read_and_bad_ones_named() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(env(&[("WORLD_SIZE", "1")]).unwrap(), None);
        let e = env(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", "29500")]).unwrap().unwrap();
        assert_eq!(
            (e.rank, e.world_size, e.local_rank, e.master_addr.as_str(), e.master_port),
            (1, 2, 1, "127.0.0.1", 29500)
        );
        assert!(!e.agent_store);
        let e = env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.local_rank, e.master_addr.as_str(), e.agent_store, e.restart), (1, "node0", true, 2));
        let msg = |v: &[(&str, &str)]| env(v).unwrap_err().to_string();
        assert_eq!(msg(&[("WORLD_SIZE", "two")]), "WORLD_SIZE=\"two\": is not a whole number");
        assert_eq!(msg(&[("WORLD_SIZE", "2")]), "RANK=\"\": must be set when WORLD_SIZE is");
        assert_eq!(
            msg(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")]),
            "RANK=\"2\": must be less than WORLD_SIZE"
        );
        assert_eq!(
            msg(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "70000")]),
            "MASTER_PORT=\"70000\": is not a port (1 to 65535)"
        );
        assert_eq!(msg(&[("WORLD_SIZE", "0"), ("RANK", "0")]), "WORLD_SIZE=\"0\": is out of range");
    }
}
