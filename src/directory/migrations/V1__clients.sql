-- The client directory. A record's JSON form is the same as a folder directory's
-- `<id>.json` (see `directory::ClientRecord`); the columns beside it are what queries use.
CREATE TABLE vigil_clients (
    id         text PRIMARY KEY,
    status     text NOT NULL,
    revision   bigint NOT NULL DEFAULT 0,
    record     jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The photo a client was enrolled from.
CREATE TABLE vigil_reference_photos (
    client_id text PRIMARY KEY REFERENCES vigil_clients (id) ON DELETE CASCADE,
    name      text NOT NULL,
    jpeg      bytea NOT NULL
);

-- Which edge holds a client, as that edge last said (`directory::Presence`).
CREATE TABLE vigil_presence (
    client_id text PRIMARY KEY REFERENCES vigil_clients (id) ON DELETE CASCADE,
    edge      text NOT NULL,
    presence  jsonb NOT NULL
);
CREATE INDEX vigil_presence_by_edge ON vigil_presence (edge);

-- A client's policy state, carried from one session to the next (`policy::SavedPolicy`).
CREATE TABLE vigil_policy_state (
    client_id text PRIMARY KEY REFERENCES vigil_clients (id) ON DELETE CASCADE,
    state     jsonb NOT NULL
);

-- Each edge's lease: its presence rows count only while the lease runs.
CREATE TABLE vigil_edge_leases (
    edge           text PRIMARY KEY,
    lease_until_ms bigint NOT NULL
);
