-- Objects that need the Rust functions to exist first.

-- API: Public
-- Columns named, not h.*: a column added to the table later goes after payload_text, where
-- an update script's CREATE OR REPLACE VIEW can add it while views built on this one (an
-- Odoo addon's) stay, so installed and updated databases have the same view.
CREATE VIEW @extschema@.mqtt_message_history_text AS
SELECT h.id, h.broker_id, h.topic, h.payload, h.qos, h.retain, h.direction, h.message_id,
       h."timestamp", @extschema@.mqtt_payload_text(h.payload) AS payload_text, h.properties
FROM @extschema@.mqtt_message_history h;
COMMENT ON VIEW @extschema@.mqtt_message_history_text IS
  'mqtt_message_history plus payload_text: the payload as text when it is valid UTF-8, else NULL.';

-- API: Public. One row per broker, pg_stat_* style, for polling (see src/api/status.rs for
-- why it stays cheap with millions of rows queued). security_invoker: it shows the brokers the
-- caller may read, with the caller's privileges, never the view owner's.
CREATE VIEW @extschema@.mqtt_broker_status WITH (security_invoker = true) AS
SELECT b.id AS broker_id,
       b.name,
       s OPERATOR(pg_catalog.->>) 'status' AS status,
       b.active,
       (s OPERATOR(pg_catalog.->>) 'since')::timestamptz AS since,
       s OPERATOR(pg_catalog.->>) 'last_error' AS last_error,
       (s OPERATOR(pg_catalog.->>) 'last_error_at')::timestamptz AS last_error_at,
       (s OPERATOR(pg_catalog.->>) 'reconnects')::bigint AS reconnects,
       (s OPERATOR(pg_catalog.->>) 'messages_received')::bigint AS messages_in,
       (s OPERATOR(pg_catalog.->>) 'messages_sent')::bigint AS messages_out,
       (s OPERATOR(pg_catalog.->>) 'bytes_received')::bigint AS bytes_in,
       (s OPERATOR(pg_catalog.->>) 'bytes_sent')::bigint AS bytes_out,
       (s OPERATOR(pg_catalog.->>) 'received_per_second')::double precision AS messages_in_per_sec,
       (s OPERATOR(pg_catalog.->>) 'sent_per_second')::double precision AS messages_out_per_sec,
       (s OPERATOR(pg_catalog.->>) 'last_received_at')::timestamptz AS last_message_in_at,
       (s OPERATOR(pg_catalog.->>) 'last_sent_at')::timestamptz AS last_message_out_at,
       (s OPERATOR(pg_catalog.->>) 'outbox_depth')::bigint AS outbox_depth,
       (s OPERATOR(pg_catalog.->>) 'outbox_depth_exact')::boolean AS outbox_depth_exact,
       pg_catalog.make_interval(secs => (s OPERATOR(pg_catalog.->>) 'outbox_oldest_age_s')::double precision) AS outbox_oldest_age,
       (s OPERATOR(pg_catalog.->>) 'dead_letters')::bigint AS dead_letters,
       s OPERATOR(pg_catalog.->>) 'client_id' AS client_id,
       (s OPERATOR(pg_catalog.->>) 'worker_pid')::integer AS worker_pid
FROM @extschema@.mqtt_broker b
CROSS JOIN LATERAL @extschema@.mqtt_status(b.name) s;
COMMENT ON VIEW @extschema@.mqtt_broker_status IS
  'One row per broker: connection state since when, last error, reconnects, messages and bytes in and out since the worker started, rates over the last minute, outbox depth (exact up to 10000, estimated above) and the age of its oldest row, dead letters, client id, worker pid.';

-- API: Public. jsonb payloads are sent as jsonb's own text form.
CREATE FUNCTION @extschema@.mqtt_publish(topic text, payload jsonb, qos integer DEFAULT 0,
                                         retain boolean DEFAULT false, broker text DEFAULT NULL,
                                         properties jsonb DEFAULT NULL)
RETURNS bigint LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT @extschema@.mqtt_publish(topic, payload::text, qos, retain, broker, properties) $$;

-- API: Public. handler and target_table go to Rust as oids: the regprocedure/regclass input
-- has resolved them with the caller's search_path.
CREATE FUNCTION @extschema@.mqtt_subscribe(topic_filter text, qos integer DEFAULT 0,
                                           broker text DEFAULT NULL,
                                           handler regprocedure DEFAULT NULL,
                                           target_table regclass DEFAULT NULL,
                                           conflict_columns text[] DEFAULT NULL,
                                           notify_channel text DEFAULT NULL)
RETURNS integer LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT @extschema@._mqtt_subscribe(topic_filter, qos, broker, handler::oid, target_table::oid,
                                         conflict_columns, notify_channel) $$;

-- API: Public. A row trigger that publishes the row's change (src/triggers/mod.rs): AFTER
-- INSERT OR UPDATE OR DELETE ... FOR EACH ROW EXECUTE FUNCTION mqtt_publish_trigger(topic
-- template [, qos [, retain [, broker [, column, ...]]]]).
CREATE FUNCTION @extschema@.mqtt_publish_trigger() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'mqtt_publish_trigger';
COMMENT ON FUNCTION @extschema@.mqtt_publish_trigger() IS
  'Row trigger publishing each change as JSON {"op", "schema", "table", "new", "old"}; arguments: topic template ({schema}, {table}, {op}, {<column>}), then optionally qos, retain, broker, column names.';

-- API: Public. Create (or replace) the trigger "mqtt_watch" on tbl. SECURITY INVOKER: creating
-- a trigger takes the caller's own TRIGGER privilege on the table.
CREATE FUNCTION @extschema@.mqtt_watch_table(tbl regclass, topic_template text,
                                             qos integer DEFAULT 0, retain boolean DEFAULT false,
                                             broker text DEFAULT NULL, columns text[] DEFAULT NULL,
                                             events text[] DEFAULT '{insert,update,delete}')
RETURNS text LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    fired text;
    args text;
BEGIN
    PERFORM @extschema@._mqtt_check_watch(tbl, topic_template, qos, retain, broker, columns, events);
    -- With columns, UPDATE OF keeps the trigger from firing at all for updates that do not
    -- assign them; the trigger itself skips those that assign them without a change.
    SELECT pg_catalog.string_agg(
               CASE WHEN e OPERATOR(pg_catalog.=) 'update' AND columns IS NOT NULL
                    THEN 'UPDATE OF ' OPERATOR(pg_catalog.||)
                         (SELECT pg_catalog.string_agg(pg_catalog.quote_ident(c), ', ')
                          FROM pg_catalog.unnest(columns) c)
                    ELSE pg_catalog.upper(e) END, ' OR ')
    INTO fired
    FROM (SELECT DISTINCT pg_catalog.lower(e) AS e FROM pg_catalog.unnest(events) e) ev;
    args := pg_catalog.format('%L, %L, %L, %L', topic_template, qos::text, retain::text,
                              COALESCE(broker, ''))
            OPERATOR(pg_catalog.||) COALESCE((SELECT pg_catalog.string_agg(pg_catalog.format(', %L', c), '')
                                              FROM pg_catalog.unnest(columns) c), '');
    EXECUTE pg_catalog.format(
        'CREATE OR REPLACE TRIGGER mqtt_watch AFTER %s ON %s FOR EACH ROW EXECUTE FUNCTION @extschema@.mqtt_publish_trigger(%s)',
        fired, tbl, args);
    RETURN 'mqtt_watch';
END
$$;
COMMENT ON FUNCTION @extschema@.mqtt_watch_table(regclass, text, integer, boolean, text, text[], text[]) IS
  'Publish the changes of a table: creates (or replaces) its trigger mqtt_watch calling mqtt_publish_trigger; returns the trigger name.';

-- API: Public
CREATE FUNCTION @extschema@.mqtt_unwatch_table(tbl regclass)
RETURNS boolean LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'tbl must not be NULL' USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_trigger t
                   WHERE t.tgrelid OPERATOR(pg_catalog.=) tbl
                     AND t.tgname OPERATOR(pg_catalog.=) 'mqtt_watch'
                     AND t.tgfoid OPERATOR(pg_catalog.=) '@extschema@.mqtt_publish_trigger()'::pg_catalog.regprocedure) THEN
        RETURN false;
    END IF;
    EXECUTE pg_catalog.format('DROP TRIGGER mqtt_watch ON %s', tbl);
    RETURN true;
END
$$;
COMMENT ON FUNCTION @extschema@.mqtt_unwatch_table(regclass) IS
  'Stop publishing the changes of a table (drops the trigger mqtt_watch); true if it was watched.';

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

-- API: Public. Requeue every dead letter of a broker (NULL: the default broker), oldest first.
-- A received one whose routing still fails stays, with the new error; returns how many moved.
CREATE FUNCTION @extschema@.mqtt_requeue_dead_letters(broker text DEFAULT NULL)
RETURNS integer LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target integer := @extschema@._mqtt_broker_id(broker);
    n integer := 0;
    dead_id bigint;
    failure text;
BEGIN
    -- SKIP LOCKED: rows another session is requeueing right now are its to move.
    FOR dead_id IN SELECT id FROM @extschema@.mqtt_dead_letter
                   WHERE broker_id OPERATOR(pg_catalog.=) target ORDER BY id
                   FOR UPDATE SKIP LOCKED LOOP
        BEGIN
            PERFORM @extschema@.mqtt_requeue_dead_letter(dead_id);
            n := n OPERATOR(pg_catalog.+) 1;
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS failure = MESSAGE_TEXT;
            UPDATE @extschema@.mqtt_dead_letter SET error = failure
            WHERE id OPERATOR(pg_catalog.=) dead_id;
        END;
    END LOOP;
    RETURN n;
END
$$;

-- API: Private. Broker secrets are write-only (see src/security/secrets.rs). PostgreSQL fires
-- BEFORE triggers in name order. The two secret triggers fire on INSERT and on an UPDATE that
-- assigns their column (so SET host = ... leaves the password alone, SET password = NULL
-- clears it); an INSERT without the secret keeps the sealed form it brings (a restored dump:
-- it opens only on the server that sealed it, for the same endpoint). The check runs last, on
-- every write.
CREATE FUNCTION @extschema@._mqtt_broker_password_set() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.password IS NOT NULL THEN
        NEW.password_sealed := @extschema@._mqtt_seal_password(NEW.password, NEW.host, NEW.port,
                                                               NEW.username, NEW.use_tls, NEW.ca_cert,
                                                               NEW.tls_server_name);
        NEW.password := NULL;
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
        NEW.password_sealed := NULL;
    END IF;
    RETURN NEW;
END
$$;

CREATE FUNCTION @extschema@._mqtt_broker_client_key_set() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.client_key IS NOT NULL THEN
        NEW.client_key_sealed := @extschema@._mqtt_seal_client_key(NEW.client_key, NEW.client_cert);
        NEW.client_key := NULL;
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
        NEW.client_key_sealed := NULL;
    END IF;
    RETURN NEW;
END
$$;

CREATE FUNCTION @extschema@._mqtt_broker_check() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP OPERATOR(pg_catalog.=) 'UPDATE'
       AND NEW.password_sealed IS NOT NULL
       AND NEW.password_sealed IS NOT DISTINCT FROM OLD.password_sealed
       AND (NEW.host, NEW.port, NEW.username, NEW.use_tls, NEW.ca_cert, NEW.tls_server_name) IS DISTINCT FROM
           (OLD.host, OLD.port, OLD.username, OLD.use_tls, OLD.ca_cert, OLD.tls_server_name) THEN
        -- The password is bound to where and how it is sent: pointing the row elsewhere, or
        -- turning TLS off, or trusting another CA, must not carry it along (that would let
        -- whoever edits the row, but may not read the password, receive it at a broker of
        -- their own or read it on the wire).
        NEW.password_sealed := NULL;
        RAISE NOTICE 'the password of MQTT broker "%" was cleared because host, port, username, use_tls, ca_cert or tls_server_name changed', NEW.name
            USING HINT = 'Set it again in the same UPDATE: UPDATE mqtt_broker SET host = ..., password = ... WHERE name = ...';
    END IF;
    IF TG_OP OPERATOR(pg_catalog.=) 'INSERT'
       OR NEW.ca_cert IS DISTINCT FROM OLD.ca_cert
       OR NEW.client_cert IS DISTINCT FROM OLD.client_cert
       OR NEW.will_topic IS DISTINCT FROM OLD.will_topic THEN
        PERFORM @extschema@._mqtt_check_broker(NEW.ca_cert, NEW.client_cert, NEW.will_topic);
    END IF;
    IF (NEW.client_cert IS NULL) OPERATOR(pg_catalog.<>) (NEW.client_key_sealed IS NULL) THEN
        RAISE EXCEPTION 'mqtt_broker.client_cert and client_key must be set together (broker "%")', NEW.name
            USING ERRCODE = '22023',
                  HINT = 'Set both for mutual TLS, or neither: UPDATE mqtt_broker SET client_cert = ..., client_key = ... WHERE name = ...';
    END IF;
    IF NEW.will_topic IS NULL AND (NEW.will_payload IS NOT NULL OR NEW.birth_payload IS NOT NULL) THEN
        RAISE EXCEPTION 'mqtt_broker.will_payload and birth_payload need a will_topic (broker "%")', NEW.name
            USING ERRCODE = '22023', HINT = 'Set will_topic, for example ''devices/odoo/status''.';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER mqtt_broker_1_password BEFORE INSERT OR UPDATE OF password ON @extschema@.mqtt_broker
FOR EACH ROW EXECUTE FUNCTION @extschema@._mqtt_broker_password_set();
CREATE TRIGGER mqtt_broker_2_client_key BEFORE INSERT OR UPDATE OF client_key ON @extschema@.mqtt_broker
FOR EACH ROW EXECUTE FUNCTION @extschema@._mqtt_broker_client_key_set();
CREATE TRIGGER mqtt_broker_3_check BEFORE INSERT OR UPDATE ON @extschema@.mqtt_broker
FOR EACH ROW EXECUTE FUNCTION @extschema@._mqtt_broker_check();

-- API: Private. Subscriptions written directly into mqtt_topic (as an Odoo model would) need
-- the same rule as mqtt_subscribe. SECURITY INVOKER on purpose: the rule checked is the
-- writer's. mqtt_subscribe itself writes as the extension owner, after its own check.
CREATE FUNCTION @extschema@._mqtt_topic_check() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    routing_changed boolean := TG_OP OPERATOR(pg_catalog.=) 'INSERT'
        OR (NEW.broker_id, NEW.name, NEW.handler, NEW.target_table, NEW.conflict_columns, NEW.notify_channel)
           IS DISTINCT FROM (OLD.broker_id, OLD.name, OLD.handler, OLD.target_table, OLD.conflict_columns, OLD.notify_channel);
BEGIN
    -- Who made a row is not for the writer to claim: below superuser it is the writer. Routing
    -- runs as this role, so whoever changes what a subscription routes, and where, becomes it
    -- (an administrator editing another role's handler must not borrow that role's rights).
    IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) current_user)
       AND (routing_changed OR NEW.owner_role IS DISTINCT FROM OLD.owner_role) THEN
        NEW.owner_role := current_user;
    ELSIF NEW.owner_role IS NULL THEN
        NEW.owner_role := current_user;
    END IF;
    IF routing_changed OR NEW.owner_role IS DISTINCT FROM OLD.owner_role THEN
        NEW.handler := @extschema@._mqtt_check_route(NEW.name, NEW.handler, NEW.target_table,
                                                     NEW.conflict_columns, NEW.notify_channel,
                                                     NEW.owner_role);
    END IF;
    IF NEW.subscribe AND NEW.active THEN
        PERFORM @extschema@._mqtt_require_subscribe(NEW.name);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER mqtt_topic_check BEFORE INSERT OR UPDATE OF broker_id, name, subscribe, active, owner_role,
    handler, target_table, conflict_columns, notify_channel ON @extschema@.mqtt_topic
FOR EACH ROW EXECUTE FUNCTION @extschema@._mqtt_topic_check();

-- API: Private. A rule written in this transaction applies to its next publish.
CREATE FUNCTION @extschema@._mqtt_access_changed_trigger() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM @extschema@._mqtt_access_changed();
    RETURN NULL;
END
$$;
CREATE TRIGGER mqtt_access_control_changed
AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON @extschema@.mqtt_access_control
FOR EACH STATEMENT EXECUTE FUNCTION @extschema@._mqtt_access_changed_trigger();

-- API: Private. Restoring a dump into a database where CREATE EXTENSION has just made its
-- owner rule (id 1): the dumped rule 1 takes its place instead of failing on the key.
CREATE FUNCTION @extschema@._mqtt_access_restore() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM @extschema@.mqtt_access_control a
    WHERE a.id OPERATOR(pg_catalog.=) NEW.id
      AND a.description OPERATOR(pg_catalog.=) 'made by CREATE EXTENSION mqtt_pg';
    RETURN NEW;
END
$$;
CREATE TRIGGER mqtt_access_control_restore BEFORE INSERT ON @extschema@.mqtt_access_control
FOR EACH ROW EXECUTE FUNCTION @extschema@._mqtt_access_restore();

CREATE TRIGGER mqtt_broker_changed
AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON @extschema@.mqtt_broker
FOR EACH STATEMENT EXECUTE FUNCTION @extschema@._mqtt_pg_config_changed();
CREATE TRIGGER mqtt_topic_changed
AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON @extschema@.mqtt_topic
FOR EACH STATEMENT EXECUTE FUNCTION @extschema@._mqtt_pg_config_changed();

COMMENT ON FUNCTION @extschema@.mqtt_publish(text, text, integer, boolean, text, jsonb) IS
  'Queue an MQTT message (UTF-8 text payload), with MQTT 5 properties (a broker with protocol_version 5); sent only if the transaction commits, at once when it does. Returns the mqtt_outbox id.';
COMMENT ON FUNCTION @extschema@.mqtt_publish(text, bytea, integer, boolean, text, jsonb) IS
  'Queue an MQTT message (binary payload, sent byte for byte), with MQTT 5 properties; sent only if the transaction commits. Returns the mqtt_outbox id.';
COMMENT ON FUNCTION @extschema@.mqtt_publish(text, jsonb, integer, boolean, text, jsonb) IS
  'Queue an MQTT message (JSON payload), with MQTT 5 properties; sent only if the transaction commits. Returns the mqtt_outbox id.';

-- API: Public (src/api/reply.rs). A C-language declaration because it returns a history row
-- read with a snapshot newer than the caller's (see there), which must leave the function as
-- the row it is. SECURITY INVOKER: the lookup needs the caller's SELECT on
-- mqtt_message_history and obeys its row-level security. Not STRICT: NULL arguments are
-- errors (22023), not a NULL that looks like a timeout.
CREATE FUNCTION @extschema@.mqtt_wait_for_reply(correlation_data bytea,
                                                timeout interval DEFAULT '10 seconds',
                                                since timestamptz DEFAULT NULL)
RETURNS @extschema@.mqtt_message_history
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'mqtt_wait_for_reply';
COMMENT ON FUNCTION @extschema@.mqtt_wait_for_reply(bytea, interval, timestamptz) IS
  'Wait until a received message whose MQTT 5 correlation_data is this one (stored at or after since, when given) is in mqtt_message_history (committed at any time, also after this transaction started) and return the newest such row; NULL after timeout.';
COMMENT ON FUNCTION @extschema@.mqtt_start_listener(text) IS
  'Mark a broker active so the worker connects (idempotent); returns the MQTT client id.';
COMMENT ON FUNCTION @extschema@.mqtt_stop_listener(text) IS
  'Mark a broker inactive so the worker disconnects; true if it was active.';
COMMENT ON FUNCTION @extschema@.mqtt_status(text) IS
  'Connection state (connected, connecting, disconnected, stopped), last error and counters of a broker.';
COMMENT ON FUNCTION @extschema@.mqtt_subscribe(text, integer, text, regprocedure, regclass, text[], text) IS
  'Subscribe to a topic filter (an mqtt_topic row), applied live, optionally routing each message to a handler, a target table and a NOTIFY channel; returns the mqtt_topic id.';
COMMENT ON FUNCTION @extschema@.mqtt_unsubscribe(text, text) IS
  'Stop subscribing to a topic filter, live; true if it was subscribed.';
COMMENT ON FUNCTION @extschema@.mqtt_requeue_dead_letter(bigint) IS
  'Move a dead letter back: outgoing to the end of mqtt_outbox (sent at commit), received into mqtt_message_history. Returns the new row id.';
COMMENT ON FUNCTION @extschema@.mqtt_requeue_dead_letters(text) IS
  'Requeue every dead letter of a broker (NULL: the default broker), oldest first; returns how many.';
-- API: Public
CREATE FUNCTION @extschema@.mqtt_check_permission(role name, topic text, operation text)
RETURNS boolean LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT @extschema@._mqtt_check_permission(role::text, topic, operation) $$;
COMMENT ON FUNCTION @extschema@.mqtt_check_permission(name, text, text) IS
  'The mqtt_access_control decision: may role publish to (operation ''publish'') or subscribe to (''subscribe'') topic?';
COMMENT ON FUNCTION @extschema@.mqtt_payload_text(bytea) IS
  'The payload as text when it is valid UTF-8 without NUL bytes, else NULL.';
-- API: Public (src/api/test_connection.rs). EXECUTE stays with PUBLIC: each form checks the
-- table privileges that already carry its power and refuses others with 42501 and a hint (the
-- broker form: SELECT and UPDATE (active) on mqtt_broker, what starting the listener takes; the
-- host form, which points the server at any host and port: INSERT on mqtt_broker).
COMMENT ON FUNCTION @extschema@.mqtt_test_connection(text, interval) IS
  'Open one short test connection with a broker''s settings (its listener untouched): jsonb with ok, error (as mqtt_status words it), connack, tls, round_trip_ms.';
COMMENT ON FUNCTION @extschema@.mqtt_test_connection(text, integer, text, text, boolean, text, text, text, interval) IS
  'Open one short test connection to host:port with the credentials and TLS settings given (no broker row): jsonb with ok, error, connack, tls, round_trip_ms.';

-- API: Private. What keeping mqtt_message_history's daily partitions needs now (the worker
-- carries it out, src/history.rs): 'create' today's partition and the next days_ahead days'
-- (UTC) that are missing; with keep (the retention), 'drop' every range partition whose rows
-- are all older than at - keep, and 'empty' the default partition once all of its rows are.
-- Whole partitions only, never row by row. Reads, changes nothing.
CREATE FUNCTION @extschema@._mqtt_history_plan(keep interval, days_ahead integer DEFAULT 3,
                                               at timestamptz DEFAULT pg_catalog.now())
RETURNS TABLE (action text, part text, lo timestamptz, hi timestamptz)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    parent pg_catalog.regclass := '@extschema@.mqtt_message_history'::pg_catalog.regclass;
    today date := (at AT TIME ZONE 'UTC')::date;
    cutoff timestamptz := at OPERATOR(pg_catalog.-) keep;
    day date;
    candidate text;
    p record;
BEGIN
    IF keep IS NOT NULL AND keep OPERATOR(pg_catalog.<=) '0'::interval THEN
        RAISE EXCEPTION 'retention must be longer than zero, not %', keep USING ERRCODE = '22023';
    END IF;
    FOR i IN 0 .. COALESCE(days_ahead, 3) LOOP
        day := today OPERATOR(pg_catalog.+) i;
        lo := day::timestamp AT TIME ZONE 'UTC';
        hi := (day OPERATOR(pg_catalog.+) 1)::timestamp AT TIME ZONE 'UTC';
        CONTINUE WHEN cutoff OPERATOR(pg_catalog.>=) hi;
        -- A partition covering part of the day (ours, or made by hand) already takes its rows.
        CONTINUE WHEN EXISTS (
            SELECT FROM pg_catalog.pg_inherits i
            JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) i.inhrelid
            WHERE i.inhparent OPERATOR(pg_catalog.=) parent
              AND NOT (COALESCE(@extschema@._mqtt_partition_bound(c.oid, 'TO') OPERATOR(pg_catalog.<=) lo, false)
                       OR COALESCE(@extschema@._mqtt_partition_bound(c.oid, 'FROM') OPERATOR(pg_catalog.>=) hi, false))
              AND pg_catalog.pg_get_expr(c.relpartbound, c.oid) OPERATOR(pg_catalog.<>) 'DEFAULT');
        -- A day the default partition already holds rows of (stored before the worker first
        -- ran, or dated ahead by hand) stays there: a partition for it could not be attached.
        CONTINUE WHEN EXISTS (SELECT FROM @extschema@.mqtt_message_history_default h
                              WHERE h."timestamp" OPERATOR(pg_catalog.>=) lo
                                AND h."timestamp" OPERATOR(pg_catalog.<) hi);
        -- The day's name, or when something else has taken it (a table of the same name made
        -- by hand), the first free of name_2 .. name_9: a taken name must not keep the day
        -- from getting its partition.
        part := NULL;
        FOR n IN 1 .. 9 LOOP
            candidate := 'mqtt_message_history_' OPERATOR(pg_catalog.||) pg_catalog.to_char(day, 'YYYYMMDD')
                         OPERATOR(pg_catalog.||) CASE WHEN n OPERATOR(pg_catalog.=) 1 THEN '' ELSE '_' OPERATOR(pg_catalog.||) n END;
            IF NOT EXISTS (SELECT FROM pg_catalog.pg_class c
                           WHERE c.relname OPERATOR(pg_catalog.=) candidate
                             AND c.relnamespace OPERATOR(pg_catalog.=) '@extschema@'::pg_catalog.regnamespace)
               AND NOT EXISTS (SELECT FROM pg_catalog.pg_type t
                               WHERE t.typname OPERATOR(pg_catalog.=) candidate
                                 AND t.typnamespace OPERATOR(pg_catalog.=) '@extschema@'::pg_catalog.regnamespace) THEN
                part := candidate;
                EXIT;
            END IF;
        END LOOP;
        IF part IS NULL THEN
            RAISE WARNING 'mqtt_pg: no free name for the partition of % (mqtt_message_history_% .. _9 are taken); its rows go to mqtt_message_history_default', day, pg_catalog.to_char(day, 'YYYYMMDD');
            CONTINUE;
        END IF;
        action := 'create';
        RETURN NEXT;
    END LOOP;
    IF keep IS NULL THEN
        RETURN;
    END IF;
    FOR p IN SELECT c.oid::pg_catalog.regclass::text AS name, @extschema@._mqtt_partition_bound(c.oid, 'FROM') AS lower,
                    @extschema@._mqtt_partition_bound(c.oid, 'TO') AS upper
             FROM pg_catalog.pg_inherits i
             JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) i.inhrelid
             WHERE i.inhparent OPERATOR(pg_catalog.=) parent
             ORDER BY 3 LOOP
        CONTINUE WHEN p.upper IS NULL OR p.upper OPERATOR(pg_catalog.>) cutoff;
        action := 'drop';
        part := p.name;
        lo := p.lower;
        hi := p.upper;
        RETURN NEXT;
    END LOOP;
    IF EXISTS (SELECT FROM @extschema@.mqtt_message_history_default)
       AND NOT EXISTS (SELECT FROM @extschema@.mqtt_message_history_default h
                       WHERE h."timestamp" OPERATOR(pg_catalog.>=) cutoff) THEN
        action := 'empty';
        part := 'mqtt_message_history_default';
        lo := NULL;
        hi := NULL;
        RETURN NEXT;
    END IF;
END
$$;

-- API: Private. Make one day's partition of mqtt_message_history, owned and granted like the
-- table. Called by the worker (src/history.rs) with the session marked as running the
-- extension's script, so the partition is a member of the extension and a configuration
-- table: pg_dump then dumps its rows (and not its definition), and a restore writes them
-- through the history table (the COPY hook in src/ddl.rs).
CREATE FUNCTION @extschema@._mqtt_history_partition_create(part text, lo timestamptz, hi timestamptz)
RETURNS boolean LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    parent pg_catalog.regclass := '@extschema@.mqtt_message_history'::pg_catalog.regclass;
    owner pg_catalog.oid := (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) parent);
    g record;
BEGIN
    IF part IS NULL OR part OPERATOR(pg_catalog.!~) '^mqtt_message_history_[0-9]{8}(_[0-9])?$' THEN
        RAISE EXCEPTION 'not a name of a daily partition of mqtt_message_history: %', part USING ERRCODE = '22023';
    END IF;
    -- Made meanwhile (by hand): nothing to do.
    IF pg_catalog.to_regclass('@extschema@.' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(part)) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE pg_catalog.format('CREATE TABLE @extschema@.%I PARTITION OF %s FOR VALUES FROM (%L) TO (%L)',
                              part, parent, lo, hi);
    EXECUTE pg_catalog.format('ALTER TABLE @extschema@.%I OWNER TO %I', part, pg_catalog.pg_get_userbyid(owner));
    -- Whoever may read or write the table directly may do the same with its partitions
    -- (pg_dump and a restore work on the partitions).
    FOR g IN SELECT a.privilege_type, a.grantee, a.is_grantable
             FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
             WHERE c.oid OPERATOR(pg_catalog.=) parent AND a.grantee OPERATOR(pg_catalog.<>) owner LOOP
        EXECUTE pg_catalog.format('GRANT %s ON @extschema@.%I TO %s%s', g.privilege_type, part,
            CASE WHEN g.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC'
                 ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(g.grantee)) END,
            CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
    PERFORM pg_catalog.pg_extension_config_dump(
        ('@extschema@.' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(part))::pg_catalog.regclass, '');
    RETURN true;
END
$$;

-- API: Private. Drop one partition of mqtt_message_history (retention), named schema-qualified
-- as _mqtt_history_plan gives it: out of the extension first (and so out of its configuration
-- tables), then the table.
CREATE FUNCTION @extschema@._mqtt_history_partition_drop(part text)
RETURNS void LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel pg_catalog.regclass := pg_catalog.to_regclass(part);
BEGIN
    IF rel IS NULL OR NOT EXISTS (SELECT FROM pg_catalog.pg_inherits i
                                  WHERE i.inhrelid OPERATOR(pg_catalog.=) rel
                                    AND i.inhparent OPERATOR(pg_catalog.=) '@extschema@.mqtt_message_history'::pg_catalog.regclass) THEN
        RAISE EXCEPTION 'not a partition of mqtt_message_history: %', part USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_depend d
               WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                 AND d.objid OPERATOR(pg_catalog.=) rel AND d.deptype OPERATOR(pg_catalog.=) 'e') THEN
        EXECUTE pg_catalog.format('ALTER EXTENSION mqtt_pg DROP TABLE %s', rel);
    END IF;
    EXECUTE pg_catalog.format('DROP TABLE %s', rel);
END
$$;

-- API: Private. The FROM or TO bound of a range partition of mqtt_message_history (NULL for the
-- default partition and for MINVALUE/MAXVALUE).
CREATE FUNCTION @extschema@._mqtt_partition_bound(part pg_catalog.oid, side text)
RETURNS timestamptz LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.substring(pg_catalog.pg_get_expr(c.relpartbound, c.oid),
                                side OPERATOR(pg_catalog.||) ' \(''([^'']*)''\)')::timestamptz
    FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) part
$$;

-- API: Private. Deletes dead letters older than now() - keep, at most batch rows a call (the
-- worker calls again while it deletes a full batch). Returns how many it deleted.
CREATE FUNCTION @extschema@._mqtt_dead_letter_expire(keep interval, batch integer DEFAULT 10000)
RETURNS bigint LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM @extschema@.mqtt_dead_letter d
        WHERE d.id OPERATOR(pg_catalog.=) ANY (ARRAY(
            SELECT o.id FROM @extschema@.mqtt_dead_letter o
            WHERE o."timestamp" OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) keep)
            ORDER BY o."timestamp" LIMIT batch))
        RETURNING 1)
    SELECT pg_catalog.count(*) FROM gone
$$;

-- The configuration trigger wakes the worker on behalf of whoever edited the tables; the wake
-- function itself is internal.
-- PostgreSQL checks EXECUTE on a trigger function only at CREATE TRIGGER, so revoking it keeps
-- other roles from attaching it to tables of their own without affecting these triggers.
ALTER FUNCTION @extschema@._mqtt_pg_config_changed() SECURITY DEFINER;
REVOKE ALL ON FUNCTION @extschema@._mqtt_pg_config_changed() FROM PUBLIC;
ALTER FUNCTION @extschema@._mqtt_broker_deleted() SECURITY DEFINER;
REVOKE ALL ON FUNCTION @extschema@._mqtt_broker_deleted() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_broker_cascade(integer[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_pg_wake(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_history_plan(interval, integer, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_history_partition_create(text, timestamptz, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_history_partition_drop(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_partition_bound(pg_catalog.oid, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_dead_letter_expire(interval, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_broker_id(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_seal_password(text, text, integer, text, boolean, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_seal_client_key(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_check_broker(text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_broker_password_set() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_broker_client_key_set() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_broker_check() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_access_restore() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_access_changed_trigger() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_topic_check() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._mqtt_route_requeued(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.mqtt_requeue_dead_letter(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.mqtt_requeue_dead_letters(text) FROM PUBLIC;

-- Privileges. CREATE EXTENSION needs a superuser, so the superuser owns these tables; the
-- database's owner (Odoo's role, which is not a superuser) administers them: it configures
-- brokers, topics and access rules directly, reads and prunes history, requeues dead letters,
-- and can dump and restore all of it with pg_dump (hence INSERT everywhere and SELECT, UPDATE
-- on the sequences, which a restore's setval needs). It may write the secret columns but reads
-- only their sealed form, and may not touch that form (nor the generated has_* flags). It has
-- one access rule, '#' both ways, which it can narrow. Nothing is granted to PUBLIC: other
-- roles publish and subscribe through their rules, and get table privileges from the owner,
-- who holds its privileges WITH GRANT OPTION for that.
DO $grant$
DECLARE
    owner name := (SELECT pg_catalog.pg_get_userbyid(d.datdba) FROM pg_catalog.pg_database d
                   WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database());
    writable text := (SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum)
                      FROM pg_catalog.pg_attribute a
                      WHERE a.attrelid OPERATOR(pg_catalog.=) '@extschema@.mqtt_broker'::pg_catalog.regclass
                        AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
                        AND a.attgenerated OPERATOR(pg_catalog.=) ''
                        AND a.attname OPERATOR(pg_catalog.<>) ALL (ARRAY['password_sealed', 'client_key_sealed']::pg_catalog.name[]));
BEGIN
    EXECUTE pg_catalog.format('GRANT SELECT, INSERT, DELETE ON @extschema@.mqtt_broker TO %I WITH GRANT OPTION', owner);
    EXECUTE pg_catalog.format('GRANT UPDATE (%s) ON @extschema@.mqtt_broker TO %I WITH GRANT OPTION', writable, owner);
    EXECUTE pg_catalog.format('GRANT SELECT, INSERT, UPDATE, DELETE ON @extschema@.mqtt_topic, @extschema@.mqtt_access_control TO %I WITH GRANT OPTION', owner);
    EXECUTE pg_catalog.format('GRANT SELECT, INSERT, DELETE ON @extschema@.mqtt_outbox, @extschema@.mqtt_message_history, '
                              '@extschema@.mqtt_message_history_default, @extschema@.mqtt_dead_letter TO %I WITH GRANT OPTION', owner);
    EXECUTE pg_catalog.format('GRANT SELECT ON @extschema@.mqtt_message_history_text, @extschema@.mqtt_broker_status TO %I WITH GRANT OPTION', owner);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION @extschema@.mqtt_requeue_dead_letter(bigint), @extschema@.mqtt_requeue_dead_letters(text) TO %I WITH GRANT OPTION', owner);
    EXECUTE pg_catalog.format('GRANT USAGE, SELECT, UPDATE ON SEQUENCE @extschema@.mqtt_broker_id_seq, @extschema@.mqtt_topic_id_seq, '
                              '@extschema@.mqtt_outbox_id_seq, @extschema@.mqtt_message_history_id_seq, '
                              '@extschema@.mqtt_dead_letter_id_seq, @extschema@.mqtt_access_control_id_seq TO %I WITH GRANT OPTION', owner);
    INSERT INTO @extschema@.mqtt_access_control (role_name, topic_filter, allow_publish, allow_subscribe, description)
    VALUES (owner, '#', true, true, 'made by CREATE EXTENSION mqtt_pg');
END
$grant$;

-- pg_dump writes COMMENT ON EXTENSION for an extension with a comment, and only the
-- extension's owner (a superuser) may run it: an Odoo restore made as the database owner would
-- stop on that line. pg_available_extensions keeps the control file's description.
COMMENT ON EXTENSION mqtt_pg IS NULL;

-- A worker for this database starts once this transaction commits.
SELECT @extschema@._mqtt_pg_wake(2);
