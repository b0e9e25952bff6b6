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
    },
    /// Check a key set and print its member name.
    Check {
        /// The key set directory (ca.pem, peer.pem, peer-key.pem).
        dir: PathBuf,
    },
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    match a.cmd {
        Cmd::Create { dir, names } => {
            let made = crate::migration::keys::create(&dir, &names)?;
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
        Cmd::Check { dir } => {
            let set = crate::migration::keys::load(&dir)?;
            println!("{}: valid key set of member {:?}", dir.display(), set.identity);
            Ok(0)
        }
    }
}
