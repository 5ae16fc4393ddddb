-- mqtt_pg tables. Everything is created in the schema given to CREATE EXTENSION (@extschema@)
-- and referenced schema-qualified, so a caller's search_path never changes what runs.
-- Table and column names follow Odoo's model conventions (mqtt.broker -> mqtt_broker).

-- MQTT topics and text payloads are UTF-8 on the wire; a database in another encoding would
-- turn them into something else silently. Odoo's databases are UTF-8.
DO $encoding$
BEGIN
    IF pg_catalog.getdatabaseencoding() OPERATOR(pg_catalog.<>) 'UTF8' THEN
        RAISE EXCEPTION 'mqtt_pg needs a UTF8 database; this one is %', pg_catalog.getdatabaseencoding()
            USING ERRCODE = '0A000',
                  HINT = 'Create the database with ENCODING ''UTF8'' (CREATE DATABASE ... ENCODING ''UTF8'' TEMPLATE template0).';
    END IF;
END
$encoding$;

-- API: Public
CREATE TABLE @extschema@.mqtt_broker (
    id               serial PRIMARY KEY,
    name             text NOT NULL UNIQUE CHECK (name <> ''),
    host             text NOT NULL CHECK (host <> ''),
    port             integer NOT NULL DEFAULT 1883 CHECK (port BETWEEN 1 AND 65535),
    username         text CHECK (octet_length(username) <= 65535),
    -- Write-only: a trigger seals what is written here into password_sealed and leaves NULL.
    password         text CHECK (password IS NULL),
    use_tls          boolean NOT NULL DEFAULT false,
    tls_server_name  text CHECK (tls_server_name <> ''),
    ca_cert          text,
    client_cert      text,
    -- Write-only, like password.
    client_key       text CHECK (client_key IS NULL),
    -- Sealed forms (src/secret.rs in the core crate): version byte 1, nonce, ciphertext, tag.
    -- Bounded, so that a forged value cannot make the worker chew on megabytes every reload.
    password_sealed   bytea CHECK (octet_length(password_sealed) BETWEEN 29 AND 65600
                                   AND get_byte(password_sealed, 0) = 1),
    client_key_sealed bytea CHECK (octet_length(client_key_sealed) BETWEEN 29 AND 1048576
                                   AND get_byte(client_key_sealed, 0) = 1),
    has_password     boolean GENERATED ALWAYS AS (password_sealed IS NOT NULL) STORED,
    has_client_key   boolean GENERATED ALWAYS AS (client_key_sealed IS NOT NULL) STORED,
    will_topic       text CHECK (will_topic <> ''),
    will_payload     text CHECK (octet_length(will_payload) <= 65535),
    will_qos         smallint NOT NULL DEFAULT 0 CHECK (will_qos BETWEEN 0 AND 2),
    will_retain      boolean NOT NULL DEFAULT false,
    birth_payload    text,
    client_id        text CHECK (client_id <> '' AND octet_length(client_id) <= 65535),
    keepalive        integer NOT NULL DEFAULT 60 CHECK (keepalive BETWEEN 5 AND 65535),
    clean_session    boolean NOT NULL DEFAULT false,
    max_packet_size  integer CHECK (max_packet_size BETWEEN 64 AND 268435455),
    reconnect_min_ms integer NOT NULL DEFAULT 500 CHECK (reconnect_min_ms >= 0),
    reconnect_max_ms integer NOT NULL DEFAULT 30000 CHECK (reconnect_max_ms >= reconnect_min_ms),
    is_default       boolean NOT NULL DEFAULT false,
    active           boolean NOT NULL DEFAULT false,
    create_date      timestamptz NOT NULL DEFAULT now(),
    write_date       timestamptz NOT NULL DEFAULT now(),
    -- MQTT 5 (last, where ALTER TABLE ... ADD COLUMN puts them on an upgraded database).
    protocol_version text NOT NULL DEFAULT '3.1.1' CHECK (protocol_version IN ('3.1.1', '5')),
    -- MQTT allows 0 .. 4294967295 seconds; integer holds up to 2147483647 (68 years), which
    -- is as good as "never expires" for any broker.
    session_expiry   integer CHECK (session_expiry BETWEEN 0 AND 2147483647),
    receive_maximum  integer CHECK (receive_maximum BETWEEN 1 AND 65535)
);
-- At most one default broker.
CREATE UNIQUE INDEX mqtt_broker_one_default ON @extschema@.mqtt_broker (is_default) WHERE is_default;

COMMENT ON TABLE @extschema@.mqtt_broker IS
  'MQTT broker connections. active = true means the worker keeps a connection (survives restarts); see mqtt_start_listener().';
COMMENT ON COLUMN @extschema@.mqtt_broker.name IS 'Unique name, passed as the broker argument of every mqtt_* function.';
COMMENT ON COLUMN @extschema@.mqtt_broker.password IS 'Broker password: write-only (UPDATE ... SET password = ''...''; NULL clears it). Reads give NULL; see has_password.';
COMMENT ON COLUMN @extschema@.mqtt_broker.use_tls IS 'Connect with TLS, verifying the broker against ca_cert (or the system''s CA certificates when NULL) and its host name.';
COMMENT ON COLUMN @extschema@.mqtt_broker.tls_server_name IS 'Name the broker''s certificate is checked against (NULL: host); for brokers reached by IP address.';
COMMENT ON COLUMN @extschema@.mqtt_broker.ca_cert IS 'PEM CA certificate(s) that signed the broker''s certificate (NULL: the system''s CA certificates).';
COMMENT ON COLUMN @extschema@.mqtt_broker.client_cert IS 'PEM client certificate for mutual TLS (set together with client_key).';
COMMENT ON COLUMN @extschema@.mqtt_broker.client_key IS 'PEM client key for mutual TLS: write-only (reads give NULL; see has_client_key).';
COMMENT ON COLUMN @extschema@.mqtt_broker.password_sealed IS 'The password sealed with this server''s key, bound to host, port, username and tls_server_name: unreadable elsewhere, kept by pg_dump.';
COMMENT ON COLUMN @extschema@.mqtt_broker.client_key_sealed IS 'The client key sealed with this server''s key.';
COMMENT ON COLUMN @extschema@.mqtt_broker.has_password IS 'A password is set.';
COMMENT ON COLUMN @extschema@.mqtt_broker.has_client_key IS 'A client key is set.';
COMMENT ON COLUMN @extschema@.mqtt_broker.will_topic IS 'Last Will topic: the broker publishes will_payload there when the connection dies without a clean disconnect.';
COMMENT ON COLUMN @extschema@.mqtt_broker.will_payload IS 'Last Will payload (for example ''offline'').';
COMMENT ON COLUMN @extschema@.mqtt_broker.will_qos IS 'QoS of the will and of the birth message.';
COMMENT ON COLUMN @extschema@.mqtt_broker.will_retain IS 'Retain the will and the birth message, so the topic always says online or offline.';
COMMENT ON COLUMN @extschema@.mqtt_broker.birth_payload IS 'Published to will_topic after every connect (for example ''online'').';
COMMENT ON COLUMN @extschema@.mqtt_broker.client_id IS 'MQTT client id; NULL means a stable id derived from cluster, database and broker.';
COMMENT ON COLUMN @extschema@.mqtt_broker.keepalive IS 'MQTT keep-alive, seconds.';
COMMENT ON COLUMN @extschema@.mqtt_broker.clean_session IS 'false (default): a persistent session, so the broker keeps subscriptions and queues QoS 1/2 messages while the listener is away; true: start afresh on every connect.';
COMMENT ON COLUMN @extschema@.mqtt_broker.max_packet_size IS 'Largest MQTT packet sent to this broker, bytes (NULL: the MQTT maximum, 256 MiB). Larger outbox rows go to mqtt_dead_letter instead.';
COMMENT ON COLUMN @extschema@.mqtt_broker.reconnect_min_ms IS 'First reconnect delay after a failure, ms (grows exponentially, with jitter).';
COMMENT ON COLUMN @extschema@.mqtt_broker.reconnect_max_ms IS 'Longest reconnect delay, ms.';
COMMENT ON COLUMN @extschema@.mqtt_broker.is_default IS 'The broker used when a function gets broker => NULL (at most one).';
COMMENT ON COLUMN @extschema@.mqtt_broker.active IS 'The worker should keep a connection to this broker.';
COMMENT ON COLUMN @extschema@.mqtt_broker.protocol_version IS 'MQTT protocol version: ''3.1.1'' (default) or ''5''. Message properties (mqtt_publish(..., properties)) need ''5''.';
COMMENT ON COLUMN @extschema@.mqtt_broker.session_expiry IS 'MQTT 5 Session Expiry Interval, seconds, 0 to 2147483647 (MQTT allows up to 4294967295, which integer cannot hold). NULL: as on 3.1.1, the session lasts as long as the broker keeps it unless clean_session; 0: it ends with the connection.';
COMMENT ON COLUMN @extschema@.mqtt_broker.receive_maximum IS 'MQTT 5 Receive Maximum the listener announces: unacknowledged QoS 1 and 2 messages the broker may send at once, 1 to 65535 (NULL: the protocol default, 65535).';

-- API: Public
CREATE TABLE @extschema@.mqtt_topic (
    id           serial PRIMARY KEY,
    broker_id    integer NOT NULL REFERENCES @extschema@.mqtt_broker (id) ON DELETE CASCADE,
    name         text NOT NULL CHECK (name <> ''),
    description  text,
    qos          smallint NOT NULL DEFAULT 0 CHECK (qos BETWEEN 0 AND 2),
    retain       boolean NOT NULL DEFAULT false,
    subscribe    boolean NOT NULL DEFAULT false,
    -- The function as its regprocedure text (schema-qualified): pg_upgrade refuses regprocedure
    -- columns, and the text survives dump and restore.
    handler      text,
    target_table regclass,
    conflict_columns text[] CHECK (cardinality(conflict_columns) > 0),
    notify_channel text CHECK (notify_channel <> '' AND octet_length(notify_channel) <= 63),
    owner_role   text,
    active       boolean NOT NULL DEFAULT true,
    create_date  timestamptz NOT NULL DEFAULT now(),
    write_date   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (broker_id, name)
);
COMMENT ON TABLE @extschema@.mqtt_topic IS
  'Topics and topic filters in use; rows with subscribe = true (and active) are the listener''s subscriptions.';
COMMENT ON COLUMN @extschema@.mqtt_topic.qos IS 'Subscription QoS (0, 1 or 2).';
COMMENT ON COLUMN @extschema@.mqtt_topic.subscribe IS 'Subscribe to this filter while the broker is active.';
COMMENT ON COLUMN @extschema@.mqtt_topic.owner_role IS 'The role that made or last configured the subscription (set by mqtt_subscribe and by direct writes): its handler and target table run as this role. Other roles without UPDATE on mqtt_topic cannot change or remove it.';
COMMENT ON COLUMN @extschema@.mqtt_topic.name IS 'Topic name or filter (+ and # wildcards allowed for subscriptions; a level written {name} is subscribed as + and its value goes to the target table''s column name).';
COMMENT ON COLUMN @extschema@.mqtt_topic.handler IS 'Function f(msg mqtt_message_history) RETURNS void called for each received message, in the transaction that stores it (regprocedure text, e.g. public.on_reading(public.mqtt_message_history)).';
COMMENT ON COLUMN @extschema@.mqtt_topic.target_table IS 'Table each received JSON object (or array of objects) becomes rows of, keys to columns by name.';
COMMENT ON COLUMN @extschema@.mqtt_topic.conflict_columns IS 'Columns of a unique index of target_table: rows are upserted on them (the latest reading per device).';
COMMENT ON COLUMN @extschema@.mqtt_topic.notify_channel IS 'NOTIFY channel told {"id": history id, "topic": ...} for each received message, after commit.';

-- API: Public
CREATE TABLE @extschema@.mqtt_access_control (
    id              serial PRIMARY KEY,
    role_name       text NOT NULL CHECK (role_name <> ''),
    topic_filter    text NOT NULL CHECK (topic_filter <> ''),
    allow_publish   boolean NOT NULL DEFAULT false,
    allow_subscribe boolean NOT NULL DEFAULT false,
    description     text,
    create_date     timestamptz NOT NULL DEFAULT now(),
    write_date      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE @extschema@.mqtt_access_control IS
  'Which roles may publish to and subscribe to which topic filters. A rule for a role applies to the roles that inherit its privileges; role_name ''public'' applies to every role. No matching rule: denied (superusers are not checked).';
COMMENT ON COLUMN @extschema@.mqtt_access_control.role_name IS 'Role the rule is for (its members included), or ''public'' for every role.';
COMMENT ON COLUMN @extschema@.mqtt_access_control.topic_filter IS 'MQTT topic filter (+ and # wildcards) the rule covers.';
COMMENT ON COLUMN @extschema@.mqtt_access_control.allow_publish IS 'The role may mqtt_publish to topics matching the filter.';
COMMENT ON COLUMN @extschema@.mqtt_access_control.allow_subscribe IS 'The role may subscribe to filters that the rule''s filter covers.';

-- API: Public
-- Partitioned by day (UTC) on "timestamp", so that retention (mqtt_pg.history_retention) drops
-- whole partitions instead of deleting rows: no dead tuples, no vacuum debt, no bloat at ingest
-- rates. The worker creates each day's partition ahead of time (_mqtt_history_maintain);
-- mqtt_message_history_default, the one partition made here, takes any row no day covers (rows
-- dated before the oldest day, or before the worker first ran). A partitioned table's primary
-- key must include the partition key: (id, "timestamp"); id alone is still unique (one sequence).
CREATE TABLE @extschema@.mqtt_message_history (
    id          bigserial NOT NULL,
    broker_id   integer,
    topic       text NOT NULL,
    payload     bytea NOT NULL,
    qos         smallint NOT NULL,
    retain      boolean NOT NULL DEFAULT false,
    direction   text NOT NULL CHECK (direction IN ('receive', 'send')),
    message_id  integer,
    "timestamp" timestamptz NOT NULL DEFAULT now(),
    -- MQTT 5 properties (see mqtt_publish), NULL when the message had none.
    properties  jsonb CHECK (jsonb_typeof(properties) = 'object'),
    PRIMARY KEY (id, "timestamp")
) PARTITION BY RANGE ("timestamp");
-- No foreign key and one cheap BRIN index: this table takes the ingest rate.
CREATE INDEX mqtt_message_history_timestamp ON @extschema@.mqtt_message_history USING brin ("timestamp");
CREATE TABLE @extschema@.mqtt_message_history_default PARTITION OF @extschema@.mqtt_message_history DEFAULT;
-- mqtt_wait_for_reply looks replies up by correlation data. Partial: only received messages
-- that carry correlation data have an entry, so ingest of everything else pays only for the
-- predicate. Made on the parent, so every partition (those the worker makes too) gets it.
-- A hash index: correlation data may be up to 65,535 bytes (131,070 hex digits), far over a
-- btree entry's limit of about 2.7 kB, and the look-up is by equality only.
CREATE INDEX mqtt_message_history_correlation ON @extschema@.mqtt_message_history
    USING hash ((properties OPERATOR(pg_catalog.->>) 'correlation_data'))
    WHERE direction OPERATOR(pg_catalog.=) 'receive' AND properties OPERATOR(pg_catalog.?) 'correlation_data';
COMMENT ON TABLE @extschema@.mqtt_message_history IS
  'Every message received (direction receive) and delivered (direction send). payload holds the exact bytes; see view mqtt_message_history_text for a text form. Partitioned by day; mqtt_pg.history_retention drops old days.';
COMMENT ON COLUMN @extschema@.mqtt_message_history.message_id IS 'MQTT packet id; NULL for QoS 0.';
COMMENT ON COLUMN @extschema@.mqtt_message_history."timestamp" IS 'When the worker read the message (receive) or recorded its delivery (send).';
COMMENT ON COLUMN @extschema@.mqtt_message_history.properties IS 'MQTT 5 properties as JSON (content_type, payload_format, message_expiry, response_topic, correlation_data as hex, user_properties as [name, value] pairs); NULL when none. Sent messages keep what mqtt_publish was given.';
COMMENT ON TABLE @extschema@.mqtt_message_history_default IS
  'Rows of mqtt_message_history that no daily partition covers; emptied by retention once all of them are older than mqtt_pg.history_retention.';

-- API: Public (read it; the worker and mqtt_publish write it)
-- No foreign key to mqtt_broker: its check was a query per queued message, a quarter of a bulk
-- publish. A publisher locks the broker's row once per statement instead (FOR KEY SHARE, as the
-- check did), deleting a broker deletes its queued messages (_mqtt_broker_deleted), and the
-- worker sets aside rows written directly with an id no broker has.
CREATE TABLE @extschema@.mqtt_outbox (
    id         bigserial PRIMARY KEY,
    broker_id  integer NOT NULL,
    topic      text NOT NULL,
    payload    bytea NOT NULL,
    qos        smallint NOT NULL CHECK (qos BETWEEN 0 AND 2),
    retain     boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- MQTT 5 properties, normalized by mqtt_publish; NULL when none. message_expiry counts
    -- from created_at: the worker sends what is left of it, or dead-letters the row.
    properties jsonb CHECK (jsonb_typeof(properties) = 'object')
);
CREATE INDEX mqtt_outbox_broker ON @extschema@.mqtt_outbox (broker_id, id);
COMMENT ON TABLE @extschema@.mqtt_outbox IS
  'Committed messages waiting for delivery (the durable copy). A row leaves when the broker has it, and moves to mqtt_message_history with direction send.';
COMMENT ON COLUMN @extschema@.mqtt_outbox.properties IS 'MQTT 5 properties (see mqtt_publish); NULL when none. A message_expiry that runs out before the row is sent moves it to mqtt_dead_letter.';

-- API: Public
CREATE TABLE @extschema@.mqtt_dead_letter (
    id          bigserial PRIMARY KEY,
    broker_id   integer,
    topic       text NOT NULL,
    payload     bytea NOT NULL,
    qos         smallint NOT NULL,
    retain      boolean NOT NULL DEFAULT false,
    direction   text NOT NULL CHECK (direction IN ('receive', 'send')),
    error       text NOT NULL,
    "timestamp" timestamptz NOT NULL DEFAULT now(),
    properties  jsonb CHECK (jsonb_typeof(properties) = 'object')
);
CREATE INDEX mqtt_dead_letter_broker ON @extschema@.mqtt_dead_letter (broker_id, id);
CREATE INDEX mqtt_dead_letter_timestamp ON @extschema@.mqtt_dead_letter ("timestamp");
COMMENT ON TABLE @extschema@.mqtt_dead_letter IS
  'Messages that could not be delivered or stored, with the reason.';
COMMENT ON COLUMN @extschema@.mqtt_dead_letter.properties IS 'The message''s MQTT 5 properties, as in mqtt_outbox and mqtt_message_history; NULL when none.';

-- API: Private. Changes to brokers and topics wake the worker at commit, so edits made directly
-- (as an Odoo model does) apply at once; the worker also re-reads them every mqtt_pg.poll_interval.
CREATE FUNCTION @extschema@._mqtt_pg_config_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM @extschema@._mqtt_pg_wake(2);
    RETURN NULL;
END
$$;

-- API: Private. What the outbox's foreign key did (see mqtt_outbox): a deleted broker's queued
-- messages go with it, and its id cannot change while it has any. SECURITY DEFINER (see
-- finalize.sql): the roles that may delete brokers need no privilege on the outbox for this.
CREATE FUNCTION @extschema@._mqtt_broker_deleted() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP OPERATOR(pg_catalog.=) 'TRUNCATE' THEN
        TRUNCATE @extschema@.mqtt_outbox;
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
        -- with the latest snapshot, as a foreign key's cascade (see _mqtt_broker_cascade)
        PERFORM @extschema@._mqtt_broker_cascade(ARRAY(SELECT d.id FROM mqtt_deleted_brokers d));
    ELSIF EXISTS (SELECT FROM @extschema@.mqtt_outbox o WHERE o.broker_id OPERATOR(pg_catalog.=) OLD.id) THEN
        RAISE EXCEPTION 'the id of MQTT broker "%" cannot change while it has messages in mqtt_outbox', OLD.name
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER mqtt_broker_deleted AFTER DELETE ON @extschema@.mqtt_broker
REFERENCING OLD TABLE AS mqtt_deleted_brokers
FOR EACH STATEMENT EXECUTE FUNCTION @extschema@._mqtt_broker_deleted();
CREATE TRIGGER mqtt_broker_truncated AFTER TRUNCATE ON @extschema@.mqtt_broker
FOR EACH STATEMENT EXECUTE FUNCTION @extschema@._mqtt_broker_deleted();
CREATE TRIGGER mqtt_broker_id_changed AFTER UPDATE OF id ON @extschema@.mqtt_broker
FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id) EXECUTE FUNCTION @extschema@._mqtt_broker_deleted();

-- Configuration, queued messages and history are the user's data: pg_dump must include them
-- (it leaves out the contents of extension tables unless told otherwise), so an Odoo backup
-- and restore keeps brokers, subscriptions, undelivered messages and history.
SELECT pg_catalog.pg_extension_config_dump('@extschema@.mqtt_broker', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.mqtt_broker_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.mqtt_topic', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.mqtt_topic_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.mqtt_access_control', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.mqtt_access_control_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.mqtt_outbox', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.mqtt_outbox_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.mqtt_message_history', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.mqtt_message_history_default', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.mqtt_message_history_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.mqtt_dead_letter', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.mqtt_dead_letter_id_seq', '');
