//! Identities of sockets' owners, resolved once per socket rather than once
//! per event: a traced socket carries one message per request, and resolving
//! an identity (cgroup path, pod parse, pod naming) costs far more than
//! handling the message.

use std::sync::Arc;

use crate::{cookie_map::CookieMap, events::Owner};

use super::Identity;

/// Sockets whose identity is kept; about 1 KiB each at most (a pod's cgroup
/// path and names), so 4 MiB in all.
pub const SOCKET_IDENTITY_ENTRIES: usize = 4096;

struct Resolved {
    /// The owner it was resolved for: a socket announced again with another
    /// owner must not keep the old one's identity.
    owner: Owner,
    /// The pod directory's generation it was named at.
    pods_generation: u64,
    identity: Arc<Identity>,
}

pub struct SocketIdentities {
    sockets: CookieMap<Resolved>,
}

impl SocketIdentities {
    pub fn new(capacity: usize) -> SocketIdentities {
        SocketIdentities {
            sockets: CookieMap::new(capacity),
        }
    }

    /// The identity resolved for socket `cookie` owned by `owner`, unless the
    /// owner or the pod directory changed since.
    pub fn get(
        &mut self,
        cookie: u64,
        owner: &Owner,
        pods_generation: u64,
    ) -> Option<Arc<Identity>> {
        self.sockets
            .get(cookie)
            .filter(|r| r.pods_generation == pods_generation && r.owner == *owner)
            .map(|r| Arc::clone(&r.identity))
    }

    pub fn insert(
        &mut self,
        cookie: u64,
        owner: Owner,
        pods_generation: u64,
        identity: Arc<Identity>,
    ) {
        self.sockets.insert(
            cookie,
            Resolved {
                owner,
                pods_generation,
                identity,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::OwnerSource;

    fn owner(pid: u32) -> Owner {
        Owner {
            pid,
            comm: "origin".into(),
            cgroup_id: 9,
            source: OwnerSource::Kernel,
        }
    }

    fn identity(pid: u32) -> Arc<Identity> {
        Arc::new(Identity {
            pid: Some(pid),
            ..Identity::default()
        })
    }

    #[test]
    fn a_new_owner_or_pod_directory_is_a_miss() {
        let mut ids = SocketIdentities::new(8);
        ids.insert(1, owner(10), 0, identity(10));
        assert_eq!(ids.get(1, &owner(10), 0), Some(identity(10)));
        assert_eq!(
            ids.get(1, &owner(11), 0),
            None,
            "socket re-announced with another owner"
        );
        let mut other_comm = owner(10);
        other_comm.comm = "worker".into();
        assert_eq!(ids.get(1, &other_comm, 0), None);
        assert_eq!(ids.get(1, &owner(10), 1), None, "the pod directory changed");
        ids.insert(1, owner(11), 0, identity(11));
        assert_eq!(ids.get(1, &owner(11), 0), Some(identity(11)));
        assert_eq!(ids.get(1, &owner(10), 0), None, "the old owner is gone");
        assert_eq!(ids.get(2, &owner(10), 0), None, "another socket");
    }

    #[test]
    fn bounded() {
        let mut ids = SocketIdentities::new(4);
        for cookie in 0..100 {
            ids.insert(cookie, owner(1), 0, identity(1));
            assert!(ids.len() <= 4);
        }
        assert!(ids.get(99, &owner(1), 0).is_some(), "the newest is kept");
        assert!(ids.get(0, &owner(1), 0).is_none(), "the oldest is gone");
    }
}
