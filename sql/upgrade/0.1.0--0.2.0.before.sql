-- mqtt_pg 0.1.0 -> 0.2.0, part 1 of 3 (scripts/make_upgrade.py joins the parts into
-- sql/mqtt_pg--0.1.0--0.2.0.sql; edit the parts, not the result).
--
-- 0.2.0 changed most of the schema (write-only secrets, access rules, routing, the outbox
-- without a foreign key, partitioned history). Rather than a long list of ALTERs that could
-- leave the upgraded schema subtly unlike a fresh install, the update moves the 0.1.0 tables
-- aside into a schema of their own, drops the 0.1.0 functions and views, runs the 0.2.0
-- install script unchanged (part 2), copies every row back (part 3) and drops the old tables.
-- So an upgraded database has exactly the objects of a fresh 0.2.0 install
-- (tests/e2e/test_upgrade.py compares them), and keeps every broker, topic, queued message,
-- history row and dead letter with its id.
--
-- The worker of a 0.2.0 library sends and receives nothing while the database is at 0.1.0
-- (see catalog::require_current), so nothing moves while the rows are copied.

-- Objects of your own that depend on mqtt_pg's tables (a view over history, say) would be
-- dropped along with the old tables: refuse instead, and say which.
DO $check$
DECLARE
    blockers text;
BEGIN
    -- Views over the tables (their rewrite rules) and foreign keys into them, of relations
    -- that are not the extension's own.
    SELECT pg_catalog.string_agg(DISTINCT pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid), ', ')
    INTO blockers
    FROM pg_catalog.pg_depend d
    JOIN pg_catalog.pg_class t ON t.oid OPERATOR(pg_catalog.=) d.refobjid
    LEFT JOIN pg_catalog.pg_rewrite r ON d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_rewrite'::pg_catalog.regclass
                                     AND r.oid OPERATOR(pg_catalog.=) d.objid
    LEFT JOIN pg_catalog.pg_constraint c ON d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_constraint'::pg_catalog.regclass
                                        AND c.oid OPERATOR(pg_catalog.=) d.objid
    WHERE d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
      AND t.relnamespace OPERATOR(pg_catalog.=) '@extschema@'::pg_catalog.regnamespace
      AND t.relname OPERATOR(pg_catalog.=) ANY (ARRAY['mqtt_broker', 'mqtt_topic', 'mqtt_outbox',
                                                       'mqtt_message_history', 'mqtt_dead_letter',
                                                       'mqtt_message_history_text'])
      AND d.deptype OPERATOR(pg_catalog.=) 'n'
      AND COALESCE(r.ev_class, c.conrelid) IS NOT NULL
      AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend e
                      WHERE e.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                        AND e.objid OPERATOR(pg_catalog.=) COALESCE(r.ev_class, c.conrelid)
                        AND e.deptype OPERATOR(pg_catalog.=) 'e');
    -- Indexes and triggers of your own on the tables would go with them too.
    SELECT pg_catalog.concat_ws(', ', blockers, pg_catalog.string_agg(o.what, ', '))
    INTO blockers
    FROM (SELECT pg_catalog.format('index %s', i.indexrelid::pg_catalog.regclass) AS what
          FROM pg_catalog.pg_index i
          JOIN pg_catalog.pg_class t ON t.oid OPERATOR(pg_catalog.=) i.indrelid
          JOIN pg_catalog.pg_class x ON x.oid OPERATOR(pg_catalog.=) i.indexrelid
          WHERE t.relnamespace OPERATOR(pg_catalog.=) '@extschema@'::pg_catalog.regnamespace
            AND t.relname OPERATOR(pg_catalog.=) ANY (ARRAY['mqtt_broker', 'mqtt_topic', 'mqtt_outbox',
                                                             'mqtt_message_history', 'mqtt_dead_letter'])
            AND x.relname OPERATOR(pg_catalog.<>) ALL (ARRAY['mqtt_broker_pkey', 'mqtt_broker_name_key',
                'mqtt_broker_one_default', 'mqtt_topic_pkey', 'mqtt_topic_broker_id_name_key',
                'mqtt_message_history_pkey', 'mqtt_message_history_timestamp', 'mqtt_outbox_pkey',
                'mqtt_outbox_broker', 'mqtt_dead_letter_pkey'])
          UNION ALL
          SELECT pg_catalog.format('trigger %I on %s', g.tgname, g.tgrelid::pg_catalog.regclass)
          FROM pg_catalog.pg_trigger g
          JOIN pg_catalog.pg_class t ON t.oid OPERATOR(pg_catalog.=) g.tgrelid
          WHERE NOT g.tgisinternal
            AND t.relnamespace OPERATOR(pg_catalog.=) '@extschema@'::pg_catalog.regnamespace
            AND t.relname OPERATOR(pg_catalog.=) ANY (ARRAY['mqtt_broker', 'mqtt_topic', 'mqtt_outbox',
                                                             'mqtt_message_history', 'mqtt_dead_letter'])
            AND g.tgname OPERATOR(pg_catalog.<>) ALL (ARRAY['mqtt_broker_changed', 'mqtt_topic_changed'])) o;
    blockers := NULLIF(blockers, '');
    IF blockers IS NOT NULL THEN
        RAISE EXCEPTION 'cannot update mqtt_pg from 0.1.0: objects of your own depend on its tables: %', blockers
            USING ERRCODE = '2BP01',
                  HINT = 'Drop them, run ALTER EXTENSION mqtt_pg UPDATE, and create them again (the tables keep their names and columns).';
    END IF;
END
$check$;

CREATE SCHEMA _mqtt_pg_0_1_0;
-- Privileges other roles were given on the tables and the view (GRANT SELECT ON
-- mqtt_message_history TO reporting, say) are given again on the new ones (part 3).
CREATE TABLE _mqtt_pg_0_1_0.grants AS
SELECT c.relname::text AS relname, a.privilege_type, a.grantee, a.is_grantable
FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
WHERE c.relnamespace OPERATOR(pg_catalog.=) '@extschema@'::pg_catalog.regnamespace
  AND c.relname OPERATOR(pg_catalog.=) ANY (ARRAY['mqtt_broker', 'mqtt_topic', 'mqtt_outbox', 'mqtt_message_history',
                                                   'mqtt_dead_letter', 'mqtt_message_history_text'])
  AND a.grantee OPERATOR(pg_catalog.<>) c.relowner;
DROP VIEW @extschema@.mqtt_message_history_text;
DROP TRIGGER mqtt_broker_changed ON @extschema@.mqtt_broker;
DROP TRIGGER mqtt_topic_changed ON @extschema@.mqtt_topic;
-- Every 0.1.0 function (part 2 creates the 0.2.0 ones).
DO $drop$
DECLARE
    f pg_catalog.regprocedure;
BEGIN
    FOR f IN SELECT d.objid::pg_catalog.regprocedure FROM pg_catalog.pg_depend d
             WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
               AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass
               AND d.refobjid OPERATOR(pg_catalog.=) (SELECT e.oid FROM pg_catalog.pg_extension e
                                                      WHERE e.extname OPERATOR(pg_catalog.=) 'mqtt_pg')
               AND d.deptype OPERATOR(pg_catalog.=) 'e' LOOP
        EXECUTE pg_catalog.format('DROP FUNCTION %s', f);
    END LOOP;
END
$drop$;
-- The tables move with their indexes, constraints and sequences.
ALTER TABLE @extschema@.mqtt_broker SET SCHEMA _mqtt_pg_0_1_0;
ALTER TABLE @extschema@.mqtt_topic SET SCHEMA _mqtt_pg_0_1_0;
ALTER TABLE @extschema@.mqtt_outbox SET SCHEMA _mqtt_pg_0_1_0;
ALTER TABLE @extschema@.mqtt_message_history SET SCHEMA _mqtt_pg_0_1_0;
ALTER TABLE @extschema@.mqtt_dead_letter SET SCHEMA _mqtt_pg_0_1_0;

-- Part 2: the 0.2.0 install script, as generated.
