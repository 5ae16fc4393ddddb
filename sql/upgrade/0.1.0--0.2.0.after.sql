-- mqtt_pg 0.1.0 -> 0.2.0, part 3 of 3: every 0.1.0 row back into the 0.2.0 tables, ids kept.

-- Qualified names only from here on: a handler's regprocedure text is written with its schema.
SELECT pg_catalog.set_config('search_path', '', true);

-- Rows are copied as they are: the checks the triggers make on new rows (certificates, the
-- subscribe rule, the routing role) are for what users write, and 0.1.0 data never met them.
-- Secrets are sealed here instead, the way the triggers would.
ALTER TABLE @extschema@.mqtt_broker DISABLE TRIGGER USER;
ALTER TABLE @extschema@.mqtt_topic DISABLE TRIGGER USER;

INSERT INTO @extschema@.mqtt_broker
    (id, name, host, port, username, use_tls, ca_cert, client_cert, client_id, keepalive,
     clean_session, max_packet_size, reconnect_min_ms, reconnect_max_ms, is_default, active,
     create_date, write_date)
SELECT id, name, host, port, username, use_tls, ca_cert, client_cert, client_id, keepalive,
       clean_session, max_packet_size, reconnect_min_ms, reconnect_max_ms, is_default, active,
       create_date, write_date
FROM _mqtt_pg_0_1_0.mqtt_broker ORDER BY id;

DO $secrets$
DECLARE
    o record;
BEGIN
    FOR o IN SELECT * FROM _mqtt_pg_0_1_0.mqtt_broker
             WHERE password IS NOT NULL OR client_key IS NOT NULL ORDER BY id LOOP
        IF o.password IS NOT NULL THEN
            UPDATE @extschema@.mqtt_broker b
            SET password_sealed = @extschema@._mqtt_seal_password(o.password, o.host, o.port, o.username,
                                                                  o.use_tls, o.ca_cert, NULL)
            WHERE b.id OPERATOR(pg_catalog.=) o.id;
        END IF;
        IF o.client_key IS NOT NULL THEN
            BEGIN
                UPDATE @extschema@.mqtt_broker b
                SET client_key_sealed = @extschema@._mqtt_seal_client_key(o.client_key, o.client_cert)
                WHERE b.id OPERATOR(pg_catalog.=) o.id;
            EXCEPTION WHEN OTHERS THEN
                -- 0.1.0 could not use client keys (no TLS): one that does not fit its
                -- certificate is dropped with a warning rather than failing the update.
                UPDATE @extschema@.mqtt_broker b SET client_cert = NULL
                WHERE b.id OPERATOR(pg_catalog.=) o.id;
                RAISE WARNING 'mqtt_pg: the client key and certificate of broker "%" were not carried over: %', o.name, SQLERRM
                    USING HINT = 'Set them again: UPDATE mqtt_broker SET client_cert = ..., client_key = ... WHERE name = ...';
            END;
        END IF;
    END LOOP;
END
$secrets$;

-- Subscriptions, made the database owner's (who administers them; a superuser owner is fine
-- for plain subscriptions, which route nothing). 0.1.0 reserved handler and target_table and
-- never used them: carried over they would start routing (and could not, as a superuser), so
-- they are left out, with a warning naming what to set again with mqtt_subscribe.
INSERT INTO @extschema@.mqtt_topic
    (id, broker_id, name, description, qos, retain, subscribe, owner_role,
     active, create_date, write_date)
SELECT t.id, t.broker_id, t.name, t.description, t.qos, t.retain, t.subscribe,
       pg_catalog.pg_get_userbyid(d.datdba)::pg_catalog.text, t.active, t.create_date, t.write_date
FROM _mqtt_pg_0_1_0.mqtt_topic t
CROSS JOIN pg_catalog.pg_database d
WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()
ORDER BY t.id;

DO $reserved$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT o.id, o.name, o.handler, o.target_table FROM _mqtt_pg_0_1_0.mqtt_topic o
             WHERE o.handler IS NOT NULL OR o.target_table IS NOT NULL ORDER BY o.id LOOP
        RAISE WARNING 'mqtt_pg: subscription % ("%") had handler % and target_table % set, which 0.1.0 did not use; they were not carried over', t.id, t.name, t.handler, t.target_table
            USING HINT = 'To route its messages now, call mqtt_subscribe(topic_filter, qos, broker, handler => ..., target_table => ...) as the role the routing should run as.';
    END LOOP;
END
$reserved$;

ALTER TABLE @extschema@.mqtt_broker ENABLE TRIGGER USER;
ALTER TABLE @extschema@.mqtt_topic ENABLE TRIGGER USER;

INSERT INTO @extschema@.mqtt_outbox (id, broker_id, topic, payload, qos, retain, created_at)
SELECT id, broker_id, topic, payload, qos, retain, created_at
FROM _mqtt_pg_0_1_0.mqtt_outbox ORDER BY id;

-- Rows go to mqtt_message_history_default: the worker makes daily partitions only from now on.
INSERT INTO @extschema@.mqtt_message_history
    (id, broker_id, topic, payload, qos, retain, direction, message_id, "timestamp")
SELECT id, broker_id, topic, payload, qos, retain, direction, message_id, "timestamp"
FROM _mqtt_pg_0_1_0.mqtt_message_history ORDER BY id;

INSERT INTO @extschema@.mqtt_dead_letter
    (id, broker_id, topic, payload, qos, retain, direction, error, "timestamp")
SELECT id, broker_id, topic, payload, qos, retain, direction, error, "timestamp"
FROM _mqtt_pg_0_1_0.mqtt_dead_letter ORDER BY id;

SELECT pg_catalog.setval('@extschema@.mqtt_broker_id_seq', s.last_value, s.is_called)
FROM _mqtt_pg_0_1_0.mqtt_broker_id_seq s;
SELECT pg_catalog.setval('@extschema@.mqtt_topic_id_seq', s.last_value, s.is_called)
FROM _mqtt_pg_0_1_0.mqtt_topic_id_seq s;
SELECT pg_catalog.setval('@extschema@.mqtt_outbox_id_seq', s.last_value, s.is_called)
FROM _mqtt_pg_0_1_0.mqtt_outbox_id_seq s;
SELECT pg_catalog.setval('@extschema@.mqtt_message_history_id_seq', s.last_value, s.is_called)
FROM _mqtt_pg_0_1_0.mqtt_message_history_id_seq s;
SELECT pg_catalog.setval('@extschema@.mqtt_dead_letter_id_seq', s.last_value, s.is_called)
FROM _mqtt_pg_0_1_0.mqtt_dead_letter_id_seq s;

-- Privileges of other roles, given again (the install script gave the database owner its own).
DO $regrant$
DECLARE
    g record;
BEGIN
    -- not the database owner's: 0.2.0 gives it what it needs (and no longer UPDATE of the
    -- sealed secrets, which 0.1.0's table-wide UPDATE would bring back)
    FOR g IN SELECT * FROM _mqtt_pg_0_1_0.grants
             WHERE grantee OPERATOR(pg_catalog.<>) (SELECT d.datdba FROM pg_catalog.pg_database d
                                                    WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()) LOOP
        EXECUTE pg_catalog.format('GRANT %s ON @extschema@.%I TO %s%s', g.privilege_type, g.relname,
            CASE WHEN g.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC'
                 ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(g.grantee)) END,
            CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END
$regrant$;
DROP TABLE _mqtt_pg_0_1_0.grants;

DROP TABLE _mqtt_pg_0_1_0.mqtt_topic, _mqtt_pg_0_1_0.mqtt_outbox, _mqtt_pg_0_1_0.mqtt_message_history,
           _mqtt_pg_0_1_0.mqtt_dead_letter;
DROP TABLE _mqtt_pg_0_1_0.mqtt_broker;
DROP SCHEMA _mqtt_pg_0_1_0;

-- The old tables and sequences were configuration tables: dropping them leaves their oids in
-- pg_extension.extconfig (only ALTER EXTENSION ... DROP would take them out). Keep the ones
-- that still exist, in order, as a fresh install has them.
UPDATE pg_catalog.pg_extension e
SET extconfig = k.config, extcondition = k.condition
FROM (SELECT pg_catalog.array_agg(c.rel ORDER BY c.ord) AS config,
             pg_catalog.array_agg(c.cond ORDER BY c.ord) AS condition
      FROM pg_catalog.pg_extension x,
           ROWS FROM (pg_catalog.unnest(x.extconfig), pg_catalog.unnest(x.extcondition))
             WITH ORDINALITY AS c(rel, cond, ord)
      WHERE x.extname OPERATOR(pg_catalog.=) 'mqtt_pg'
        AND EXISTS (SELECT FROM pg_catalog.pg_class r WHERE r.oid OPERATOR(pg_catalog.=) c.rel)) k
WHERE e.extname OPERATOR(pg_catalog.=) 'mqtt_pg';
