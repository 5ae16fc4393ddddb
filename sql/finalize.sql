-- Objects that need the Rust functions to exist first.

-- API: Public
CREATE VIEW @extschema@.mqtt_message_history_text AS
SELECT h.*, @extschema@.mqtt_payload_text(h.payload) AS payload_text
FROM @extschema@.mqtt_message_history h;
COMMENT ON VIEW @extschema@.mqtt_message_history_text IS
  'mqtt_message_history plus payload_text: the payload as text when it is valid UTF-8, else NULL.';

-- API: Public. jsonb payloads are sent as jsonb's own text form.
CREATE FUNCTION @extschema@.mqtt_publish(topic text, payload jsonb, qos integer DEFAULT 0,
                                         retain boolean DEFAULT false, broker text DEFAULT NULL)
RETURNS bigint LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT @extschema@.mqtt_publish(topic, payload::text, qos, retain, broker) $$;

-- API: Public
CREATE FUNCTION @extschema@.mqtt_subscribe(topic_filter text, qos integer DEFAULT 0,
                                           broker text DEFAULT NULL,
                                           handler regprocedure DEFAULT NULL,
                                           target_table regclass DEFAULT NULL)
RETURNS integer LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT @extschema@._mqtt_subscribe(topic_filter, qos, broker, handler::oid, target_table::oid) $$;

CREATE TRIGGER mqtt_broker_changed
AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON @extschema@.mqtt_broker
FOR EACH STATEMENT EXECUTE FUNCTION @extschema@._mqtt_pg_config_changed();
CREATE TRIGGER mqtt_topic_changed
AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON @extschema@.mqtt_topic
FOR EACH STATEMENT EXECUTE FUNCTION @extschema@._mqtt_pg_config_changed();

COMMENT ON FUNCTION @extschema@.mqtt_publish(text, text, integer, boolean, text) IS
  'Queue an MQTT message (UTF-8 text payload); sent only if the transaction commits, at once when it does. Returns the mqtt_outbox id.';
COMMENT ON FUNCTION @extschema@.mqtt_publish(text, bytea, integer, boolean, text) IS
  'Queue an MQTT message (binary payload, sent byte for byte); sent only if the transaction commits. Returns the mqtt_outbox id.';
COMMENT ON FUNCTION @extschema@.mqtt_publish(text, jsonb, integer, boolean, text) IS
  'Queue an MQTT message (JSON payload); sent only if the transaction commits. Returns the mqtt_outbox id.';
COMMENT ON FUNCTION @extschema@.mqtt_start_listener(text) IS
  'Mark a broker active so the worker connects (idempotent); returns the MQTT client id.';
COMMENT ON FUNCTION @extschema@.mqtt_stop_listener(text) IS
  'Mark a broker inactive so the worker disconnects; true if it was active.';
COMMENT ON FUNCTION @extschema@.mqtt_status(text) IS
  'Connection state (connected, connecting, disconnected, stopped), last error and counters of a broker.';
COMMENT ON FUNCTION @extschema@.mqtt_subscribe(text, integer, text, regprocedure, regclass) IS
  'Subscribe to a topic filter (an mqtt_topic row), applied live; returns the mqtt_topic id.';
COMMENT ON FUNCTION @extschema@.mqtt_unsubscribe(text, text) IS
  'Stop subscribing to a topic filter, live; true if it was subscribed.';
COMMENT ON FUNCTION @extschema@.mqtt_payload_text(bytea) IS
  'The payload as text when it is valid UTF-8 without NUL bytes, else NULL.';

-- Privileges. CREATE EXTENSION needs a superuser, so the superuser owns these tables; the
-- database's owner (Odoo's role, which is not a superuser) is the one who uses them: it may
-- configure brokers and topics directly, publish, and read and prune history. Nothing is
-- granted to PUBLIC; the owner grants more where it wants to.
DO $grant$
DECLARE
    owner name := (SELECT pg_catalog.pg_get_userbyid(d.datdba) FROM pg_catalog.pg_database d
                   WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database());
BEGIN
    EXECUTE pg_catalog.format('GRANT SELECT, INSERT, UPDATE, DELETE ON @extschema@.mqtt_broker, @extschema@.mqtt_topic TO %I', owner);
    EXECUTE pg_catalog.format('GRANT SELECT, INSERT, DELETE ON @extschema@.mqtt_outbox TO %I', owner);
    EXECUTE pg_catalog.format('GRANT SELECT, DELETE ON @extschema@.mqtt_message_history, @extschema@.mqtt_dead_letter TO %I', owner);
    EXECUTE pg_catalog.format('GRANT SELECT ON @extschema@.mqtt_message_history_text TO %I', owner);
    EXECUTE pg_catalog.format('GRANT USAGE ON SEQUENCE @extschema@.mqtt_broker_id_seq, @extschema@.mqtt_topic_id_seq, @extschema@.mqtt_outbox_id_seq TO %I', owner);
END
$grant$;

-- The configuration trigger wakes the worker on behalf of whoever edited the tables; the wake
-- function itself is internal.
-- PostgreSQL checks EXECUTE on a trigger function only at CREATE TRIGGER, so revoking it keeps
-- other roles from attaching it to tables of their own without affecting these triggers.
ALTER FUNCTION @extschema@._mqtt_pg_config_changed() SECURITY DEFINER;
REVOKE ALL ON FUNCTION @extschema@._mqtt_pg_config_changed() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_pg_wake(integer) FROM PUBLIC;

-- A worker for this database starts once this transaction commits.
SELECT @extschema@._mqtt_pg_wake(2);
