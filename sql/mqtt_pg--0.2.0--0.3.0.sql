-- mqtt_pg 0.2.0 -> 0.3.0 (MQTT 5 and scale-out).
--
-- Everything 0.3.0 adds to 0.2.0's tables is a column at the end, so this is a plain ALTER of
-- each: an updated database has exactly the objects of a fresh 0.3.0 install
-- (tests/e2e/test_upgrade.py compares pg_dump --schema-only of the two) and keeps every row.
-- The function and view definitions below are copied from the 0.3.0 install script; the test
-- fails if they drift from it. The 0.3.0 library refuses to act on a 0.2.0 database (55000,
-- see catalog::require_current) until this has run, so nothing moves meanwhile.

-- mqtt_broker: the protocol and MQTT 5's session settings.
ALTER TABLE @extschema@.mqtt_broker
    ADD COLUMN protocol_version text NOT NULL DEFAULT '3.1.1' CHECK (protocol_version IN ('3.1.1', '5')),
    ADD COLUMN session_expiry   integer CHECK (session_expiry BETWEEN 0 AND 2147483647),
    ADD COLUMN receive_maximum  integer CHECK (receive_maximum BETWEEN 1 AND 65535);
COMMENT ON COLUMN @extschema@.mqtt_broker.protocol_version IS 'MQTT protocol version: ''3.1.1'' (default) or ''5''. Message properties (mqtt_publish(..., properties)) need ''5''.';
COMMENT ON COLUMN @extschema@.mqtt_broker.session_expiry IS 'MQTT 5 Session Expiry Interval, seconds, 0 to 2147483647 (MQTT allows up to 4294967295, which integer cannot hold). NULL: as on 3.1.1, the session lasts as long as the broker keeps it unless clean_session; 0: it ends with the connection.';
COMMENT ON COLUMN @extschema@.mqtt_broker.receive_maximum IS 'MQTT 5 Receive Maximum the listener announces: unacknowledged QoS 1 and 2 messages the broker may send at once, 1 to 65535 (NULL: the protocol default, 65535).';

-- MQTT 5 properties of messages: queued, stored, set aside.
ALTER TABLE @extschema@.mqtt_message_history
    ADD COLUMN properties jsonb CHECK (jsonb_typeof(properties) = 'object');
COMMENT ON COLUMN @extschema@.mqtt_message_history.properties IS 'MQTT 5 properties as JSON (content_type, payload_format, message_expiry, response_topic, correlation_data as hex, user_properties as [name, value] pairs); NULL when none. Sent messages keep what mqtt_publish was given.';
CREATE INDEX mqtt_message_history_correlation ON @extschema@.mqtt_message_history
    USING hash ((properties OPERATOR(pg_catalog.->>) 'correlation_data'))
    WHERE direction OPERATOR(pg_catalog.=) 'receive' AND properties OPERATOR(pg_catalog.?) 'correlation_data';
ALTER TABLE @extschema@.mqtt_outbox
    ADD COLUMN properties jsonb CHECK (jsonb_typeof(properties) = 'object');
COMMENT ON COLUMN @extschema@.mqtt_outbox.properties IS 'MQTT 5 properties (see mqtt_publish); NULL when none. A message_expiry that runs out before the row is sent moves it to mqtt_dead_letter.';
ALTER TABLE @extschema@.mqtt_dead_letter
    ADD COLUMN properties jsonb CHECK (jsonb_typeof(properties) = 'object');
COMMENT ON COLUMN @extschema@.mqtt_dead_letter.properties IS 'The message''s MQTT 5 properties, as in mqtt_outbox and mqtt_message_history; NULL when none.';

-- The database owner may set the new broker columns, as it may the others (the install
-- script grants UPDATE column by column, on the columns that exist then).
DO $grant$
DECLARE
    owner name := (SELECT pg_catalog.pg_get_userbyid(d.datdba) FROM pg_catalog.pg_database d
                   WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database());
BEGIN
    EXECUTE pg_catalog.format('GRANT UPDATE (protocol_version, session_expiry, receive_maximum) '
                              'ON @extschema@.mqtt_broker TO %I WITH GRANT OPTION', owner);
END
$grant$;

-- mqtt_publish takes properties: the five-argument forms give way to six-argument ones (a
-- call without properties resolves to them as before).
-- Privileges a DBA set on them (REVOKE EXECUTE ... FROM PUBLIC, GRANT to the application's
-- role) are put back on the new forms below.
-- (Kept in settings local to this transaction: a table made here would become part of the
-- extension.)
SELECT pg_catalog.set_config('mqtt_pg_update.acl_' OPERATOR(pg_catalog.||) (p.proargtypes[1])::pg_catalog.regtype::text,
                             p.proacl::text, true)
FROM pg_catalog.pg_proc p
WHERE p.pronamespace OPERATOR(pg_catalog.=) '@extschema@'::pg_catalog.regnamespace
  AND p.proname OPERATOR(pg_catalog.=) 'mqtt_publish' AND p.pronargs OPERATOR(pg_catalog.=) 5
  AND p.proacl IS NOT NULL;
DROP FUNCTION @extschema@.mqtt_publish(text, jsonb, integer, boolean, text);
DROP FUNCTION @extschema@.mqtt_publish(text, text, integer, boolean, text);
DROP FUNCTION @extschema@.mqtt_publish(text, bytea, integer, boolean, text);
CREATE  FUNCTION "mqtt_publish"(
	"topic" TEXT, /* Option < & str > */
	"payload" TEXT, /* Option < & str > */
	"qos" INT DEFAULT 0, /* Option < i32 > */
	"retain" bool DEFAULT false, /* Option < bool > */
	"broker" TEXT DEFAULT NULL, /* Option < & str > */
	"properties" jsonb DEFAULT NULL /* Option < JsonbText > */
) RETURNS bigint /* i64 */
VOLATILE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'mqtt_publish_text_properties_wrapper';
CREATE  FUNCTION "mqtt_publish"(
	"topic" TEXT, /* Option < & str > */
	"payload" bytea, /* Option < & [u8] > */
	"qos" INT DEFAULT 0, /* Option < i32 > */
	"retain" bool DEFAULT false, /* Option < bool > */
	"broker" TEXT DEFAULT NULL, /* Option < & str > */
	"properties" jsonb DEFAULT NULL /* Option < JsonbText > */
) RETURNS bigint /* i64 */
VOLATILE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'mqtt_publish_bytea_properties_wrapper';
CREATE FUNCTION @extschema@.mqtt_publish(topic text, payload jsonb, qos integer DEFAULT 0,
                                         retain boolean DEFAULT false, broker text DEFAULT NULL,
                                         properties jsonb DEFAULT NULL)
RETURNS bigint LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT @extschema@.mqtt_publish(topic, payload::text, qos, retain, broker, properties) $$;
COMMENT ON FUNCTION @extschema@.mqtt_publish(text, text, integer, boolean, text, jsonb) IS
  'Queue an MQTT message (UTF-8 text payload), with MQTT 5 properties (a broker with protocol_version 5); sent only if the transaction commits, at once when it does. Returns the mqtt_outbox id.';
COMMENT ON FUNCTION @extschema@.mqtt_publish(text, bytea, integer, boolean, text, jsonb) IS
  'Queue an MQTT message (binary payload, sent byte for byte), with MQTT 5 properties; sent only if the transaction commits. Returns the mqtt_outbox id.';
COMMENT ON FUNCTION @extschema@.mqtt_publish(text, jsonb, integer, boolean, text, jsonb) IS
  'Queue an MQTT message (JSON payload), with MQTT 5 properties; sent only if the transaction commits. Returns the mqtt_outbox id.';

DO $acl$
DECLARE
    payload text;
    acl text;
    g record;
    target text;
BEGIN
    FOREACH payload IN ARRAY ARRAY['text', 'bytea', 'jsonb'] LOOP
        acl := NULLIF(pg_catalog.current_setting('mqtt_pg_update.acl_' OPERATOR(pg_catalog.||) payload, true), '');
        CONTINUE WHEN acl IS NULL;
        target := pg_catalog.format('@extschema@.mqtt_publish(text, %s, integer, boolean, text, jsonb)', payload);
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', target);
        FOR g IN SELECT a.grantee, a.is_grantable FROM pg_catalog.aclexplode(acl::pg_catalog.aclitem[]) a
                 WHERE a.privilege_type OPERATOR(pg_catalog.=) 'EXECUTE' LOOP
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %s%s', target,
                CASE WHEN g.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC'
                     ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(g.grantee)) END,
                CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
        END LOOP;
    END LOOP;
END
$acl$;

-- The view names its columns from now on; properties come after payload_text.
-- CREATE OR REPLACE VIEW resets the view's options: a DBA's security_invoker (which makes
-- row-level security on the history apply through the view) or security_barrier is put back.
SELECT pg_catalog.set_config('mqtt_pg_update.view_options', c.reloptions::text, true)
FROM pg_catalog.pg_class c
WHERE c.oid OPERATOR(pg_catalog.=) '@extschema@.mqtt_message_history_text'::pg_catalog.regclass
  AND c.reloptions IS NOT NULL;
CREATE OR REPLACE VIEW @extschema@.mqtt_message_history_text AS
SELECT h.id, h.broker_id, h.topic, h.payload, h.qos, h.retain, h.direction, h.message_id,
       h."timestamp", @extschema@.mqtt_payload_text(h.payload) AS payload_text, h.properties
FROM @extschema@.mqtt_message_history h;
DO $options$
DECLARE
    opts text := NULLIF(pg_catalog.current_setting('mqtt_pg_update.view_options', true), '');
BEGIN
    IF opts IS NOT NULL THEN
        EXECUTE pg_catalog.format('ALTER VIEW @extschema@.mqtt_message_history_text SET (%s)',
                                  pg_catalog.array_to_string(opts::text[], ', '));
    END IF;
END
$options$;

-- Dead letters keep their properties when requeued.
CREATE OR REPLACE FUNCTION @extschema@.mqtt_requeue_dead_letter(dead_letter_id bigint)
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
    -- FOR KEY SHARE, as mqtt_publish locks it: a concurrent DELETE of the broker waits, and
    -- then takes the requeued row with it (mqtt_outbox has no foreign key).
    PERFORM FROM @extschema@.mqtt_broker b WHERE b.id OPERATOR(pg_catalog.=) d.broker_id FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the broker of dead letter % no longer exists', dead_letter_id
            USING ERRCODE = '42704',
                  HINT = 'Publish its payload again with mqtt_publish(..., broker => ...), or delete it.';
    END IF;
    IF d.direction OPERATOR(pg_catalog.=) 'send' THEN
        -- A message_expiry starts again from now: requeueing is asking for it to be sent.
        INSERT INTO @extschema@.mqtt_outbox (broker_id, topic, payload, qos, retain, properties)
        VALUES (d.broker_id, d.topic, d.payload, d.qos, d.retain, d.properties) RETURNING id INTO new_id;
        PERFORM @extschema@._mqtt_pg_wake(1);
    ELSE
        INSERT INTO @extschema@.mqtt_message_history
            (broker_id, topic, payload, qos, retain, direction, "timestamp", properties)
        VALUES (d.broker_id, d.topic, d.payload, d.qos, d.retain, 'receive', d."timestamp", d.properties)
        RETURNING id INTO new_id;
        -- Routed as if it had just arrived; an error here undoes the requeue.
        PERFORM @extschema@._mqtt_route_requeued(new_id);
    END IF;
    RETURN new_id;
END
$$;

-- Request and response.
CREATE FUNCTION @extschema@.mqtt_wait_for_reply(correlation_data bytea,
                                                timeout interval DEFAULT '10 seconds',
                                                since timestamptz DEFAULT NULL)
RETURNS @extschema@.mqtt_message_history
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'mqtt_wait_for_reply';
COMMENT ON FUNCTION @extschema@.mqtt_wait_for_reply(bytea, interval, timestamptz) IS
  'Wait until a received message whose MQTT 5 correlation_data is this one (stored at or after since, when given) is in mqtt_message_history (committed at any time, also after this transaction started) and return the newest such row; NULL after timeout.';
