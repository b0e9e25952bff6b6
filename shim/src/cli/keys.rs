//! `ums keys create DIR`: the key set of a group of outer containers, so that
//! a secure setup stays one command (docs/security.md).

use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Create a new group: a CA and member certificates. Without --names, DIR
    /// is one key set shared by every member; with --names a,b, DIR/a and
    /// DIR/b are one key set each (its name shows in the peers' logs).
    Create {
        /// Where to write the key set(s); existing files are never overwritten.
        dir: PathBuf,
        /// Member names, comma-separated: one key set each, under DIR/NAME.
        #[arg(long, value_delimiter = ',')]
        names: Vec<String>,
        /// Keep the CA's key in DIR (ca-key.pem, mode 0600; needs --names), so
        /// that the group can grow (`ums keys add`) and rotate (`ums keys rotate`).
        /// Keep DIR off the members' machines (docs/security.md).
        #[arg(long)]
        keep_ca: bool,
    },
    /// Add members to a group made with --keep-ca: DIR/NAME for each.
    Add {
        /// The group's directory (ca-key.pem, ca-cert.pem, ca.pem).
        dir: PathBuf,
        /// Member names.
        #[arg(required = true, value_delimiter = ',')]
        names: Vec<String>,
    },
    /// Replace the group's CA while its members run, in three steps: roll
    /// each out to every member (update their key sets) before the next.
    Rotate {
        /// The group's directory (made with --keep-ca).
        dir: PathBuf,
        /// trust: every member trusts the old and a new CA; certs: every
        /// member gets a certificate of the new CA; finish: the old CA is
        /// trusted no more.
        #[arg(long, value_enum)]
        step: crate::migration::keys::RotateStep,
    },
    /// Check a key set and print its member name.
    Check {
        /// The key set directory (ca.pem, peer.pem, peer-key.pem).
        dir: PathBuf,
    },
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    match a.cmd {
        Cmd::Create { dir, names, keep_ca } => {
            let made = crate::migration::keys::create(&dir, &names, keep_ca)?;
            if keep_ca {
                println!(
                    "{}: the group's CA key ({}); keep it off the members' machines",
                    dir.display(),
                    crate::migration::keys::CA_KEY_FILE
                );
            }
            for d in &made {
                let set = crate::migration::keys::load(d)?;
                println!("{}: key set of member {:?}", d.display(), set.identity);
            }
            println!(
                "mount each key set at {} in its outer container (a Secret: kubectl create secret generic \
                 ums-peer --from-file={}), or pass --peer-keys DIR",
                crate::config::Config::DEFAULT_PEER_KEYS,
                made[0].display()
            );
            Ok(0)
        }
        Cmd::Add { dir, names } => {
            for d in crate::migration::keys::add(&dir, &names)? {
                let set = crate::migration::keys::load(&d)?;
                println!("{}: key set of new member {:?}", d.display(), set.identity);
            }
            Ok(0)
        }
        Cmd::Rotate { dir, step } => {
            let members = crate::migration::keys::rotate(&dir, step)?;
            for d in &members {
                crate::migration::keys::load(d)?;
                println!("{}: updated", d.display());
            }
            let next = match step {
                crate::migration::keys::RotateStep::Trust => "then: ums keys rotate DIR --step certs",
                crate::migration::keys::RotateStep::Certs => "then: ums keys rotate DIR --step finish",
                crate::migration::keys::RotateStep::Finish => "the rotation is done",
            };
            println!("roll these key sets out to every member (peers reload them for each connection); {next}");
            Ok(0)
        }
        Cmd::Check { dir } => {
            let set = crate::migration::keys::load(&dir)?;
            println!("{}: valid key set of member {:?}", dir.display(), set.identity);
            Ok(0)
        }
    }
}
