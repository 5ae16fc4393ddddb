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

-- API: Public. Give a dead letter another chance: an outgoing one goes back to the end of the
-- outbox (sent once the transaction commits), a received one into mqtt_message_history. Returns
-- the new row's id. SECURITY DEFINER because it wakes the worker, which only the extension may.
CREATE FUNCTION @extschema@.mqtt_requeue_dead_letter(dead_letter_id bigint)
RETURNS bigint LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d @extschema@.mqtt_dead_letter;
    new_id bigint;
BEGIN
    IF dead_letter_id IS NULL THEN
        RAISE EXCEPTION 'dead_letter_id must not be NULL'
            USING ERRCODE = '22023', HINT = 'Pass an id from mqtt_dead_letter.';
    END IF;
    DELETE FROM @extschema@.mqtt_dead_letter WHERE id OPERATOR(pg_catalog.=) dead_letter_id
        RETURNING * INTO d;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no dead letter with id %', dead_letter_id
            USING ERRCODE = '42704', HINT = 'SELECT id, error FROM mqtt_dead_letter lists them.';
    END IF;
    IF NOT EXISTS (SELECT FROM @extschema@.mqtt_broker b WHERE b.id OPERATOR(pg_catalog.=) d.broker_id) THEN
        RAISE EXCEPTION 'the broker of dead letter % no longer exists', dead_letter_id
            USING ERRCODE = '42704',
                  HINT = 'Publish its payload again with mqtt_publish(..., broker => ...), or delete it.';
    END IF;
    IF d.direction OPERATOR(pg_catalog.=) 'send' THEN
        INSERT INTO @extschema@.mqtt_outbox (broker_id, topic, payload, qos, retain)
        VALUES (d.broker_id, d.topic, d.payload, d.qos, d.retain) RETURNING id INTO new_id;
        PERFORM @extschema@._mqtt_pg_wake(1);
    ELSE
        INSERT INTO @extschema@.mqtt_message_history
            (broker_id, topic, payload, qos, retain, direction, "timestamp")
        VALUES (d.broker_id, d.topic, d.payload, d.qos, d.retain, 'receive', d."timestamp")
        RETURNING id INTO new_id;
    END IF;
    RETURN new_id;
END
$$;

-- API: Public. Requeue every dead letter of a broker (NULL: the default broker), oldest first.
CREATE FUNCTION @extschema@.mqtt_requeue_dead_letters(broker text DEFAULT NULL)
RETURNS integer LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target integer := @extschema@._mqtt_broker_id(broker);
    n integer := 0;
    dead_id bigint;
BEGIN
    -- SKIP LOCKED: rows another session is requeueing right now are its to move.
    FOR dead_id IN SELECT id FROM @extschema@.mqtt_dead_letter
                   WHERE broker_id OPERATOR(pg_catalog.=) target ORDER BY id
                   FOR UPDATE SKIP LOCKED LOOP
        PERFORM @extschema@.mqtt_requeue_dead_letter(dead_id);
        n := n OPERATOR(pg_catalog.+) 1;
    END LOOP;
    RETURN n;
END
$$;

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
COMMENT ON FUNCTION @extschema@.mqtt_requeue_dead_letter(bigint) IS
  'Move a dead letter back: outgoing to the end of mqtt_outbox (sent at commit), received into mqtt_message_history. Returns the new row id.';
COMMENT ON FUNCTION @extschema@.mqtt_requeue_dead_letters(text) IS
  'Requeue every dead letter of a broker (NULL: the default broker), oldest first; returns how many.';
COMMENT ON FUNCTION @extschema@.mqtt_payload_text(bytea) IS
  'The payload as text when it is valid UTF-8 without NUL bytes, else NULL.';

-- The configuration trigger wakes the worker on behalf of whoever edited the tables; the wake
-- function itself is internal.
-- PostgreSQL checks EXECUTE on a trigger function only at CREATE TRIGGER, so revoking it keeps
-- other roles from attaching it to tables of their own without affecting these triggers.
ALTER FUNCTION @extschema@._mqtt_pg_config_changed() SECURITY DEFINER;
REVOKE ALL ON FUNCTION @extschema@._mqtt_pg_config_changed() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_pg_wake(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_broker_id(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.mqtt_requeue_dead_letter(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.mqtt_requeue_dead_letters(text) FROM PUBLIC;

-- Privileges. CREATE EXTENSION needs a superuser, so the superuser owns these tables; the
-- database's owner (Odoo's role, which is not a superuser) is the one who uses them: it may
-- configure brokers and topics directly, publish, read and prune history, and requeue dead
-- letters. Nothing is granted to PUBLIC (functions are revoked from it above); the owner grants
-- more where it wants to.
DO $grant$
DECLARE
    owner name := (SELECT pg_catalog.pg_get_userbyid(d.datdba) FROM pg_catalog.pg_database d
                   WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database());
BEGIN
    EXECUTE pg_catalog.format('GRANT SELECT, INSERT, UPDATE, DELETE ON @extschema@.mqtt_broker, @extschema@.mqtt_topic TO %I', owner);
    EXECUTE pg_catalog.format('GRANT SELECT, INSERT, DELETE ON @extschema@.mqtt_outbox TO %I', owner);
    EXECUTE pg_catalog.format('GRANT SELECT, DELETE ON @extschema@.mqtt_message_history, @extschema@.mqtt_dead_letter TO %I', owner);
    EXECUTE pg_catalog.format('GRANT SELECT ON @extschema@.mqtt_message_history_text TO %I', owner);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION @extschema@.mqtt_requeue_dead_letter(bigint), @extschema@.mqtt_requeue_dead_letters(text) TO %I', owner);
    EXECUTE pg_catalog.format('GRANT USAGE ON SEQUENCE @extschema@.mqtt_broker_id_seq, @extschema@.mqtt_topic_id_seq, @extschema@.mqtt_outbox_id_seq TO %I', owner);
END
$grant$;

-- A worker for this database starts once this transaction commits.
SELECT @extschema@._mqtt_pg_wake(2);
