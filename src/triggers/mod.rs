//! Tables that publish their own changes: `mqtt_publish_trigger()`, and `mqtt_watch_table` /
//! `mqtt_unwatch_table` (finalize.sql) that create and drop it.
//!
//! The trigger runs as the role that changed the row, and so do the conversions it makes
//! (`to_jsonb`, type output functions: they may be a user's code). Only the finished messages
//! are written to `mqtt_outbox` as the extension's owner, in batches (see `pending`).
//!
//! Arguments: topic template, then optionally qos, retain, broker ('' = the default broker),
//! then column names. With columns, the payload carries those and the primary key, and an
//! UPDATE that changes none of them publishes nothing.

pub mod pending;
mod watch;

use std::ffi::CStr;

use mqtt_pg_core::template::Template;
use pgrx::prelude::*;
use pgrx::{PgMemoryContexts, PgRelation};

use crate::api::broker;
use crate::errors::{self, INVALID_PARAMETER, PROGRAM_LIMIT};
use crate::security::access::{self, Operation};
use crate::{catalog, gucs};

/// What fills one placeholder.
enum Fill {
    Schema,
    Table,
    Op,
    /// A column, by its index in the tuple descriptor.
    Column(usize),
}

/// A value's `::text`: the type's cast to text where it has one (boolean's gives `true`, not
/// its output form `t`), else its output function.
#[derive(Clone, Copy)]
enum ToText {
    Cast(*mut pg_sys::FmgrInfo),
    Output(*mut pg_sys::FmgrInfo),
}

/// How a column's value becomes the JSON `to_jsonb` would give: for the common scalar types
/// straight from the type's output function (to_jsonb would print the value, parse it into a
/// jsonb and print that again, a fifth of a watched bulk UPDATE); for every other type (dates,
/// floats, arrays, composites, json, domains) through to_jsonb itself.
#[derive(Clone, Copy)]
enum ToJson {
    /// int2, int4, int8: the output is a JSON number as it stands.
    Integer(*mut pg_sys::FmgrInfo),
    /// numeric: a JSON number, except NaN and the infinities, which to_jsonb makes strings.
    Numeric(*mut pg_sys::FmgrInfo),
    Bool,
    /// text, varchar, char(n): the output as a JSON string, escaped as PostgreSQL escapes it.
    Text(*mut pg_sys::FmgrInfo),
    ToJsonb(*mut pg_sys::FmgrInfo),
}

impl ToJson {
    /// SAFETY: `mcxt` lives for the statement; `typ` is an existing type.
    unsafe fn new(mcxt: pg_sys::MemoryContext, to_jsonb: pg_sys::Oid, typ: pg_sys::Oid) -> ToJson {
        let output = || {
            let mut func = pg_sys::InvalidOid;
            let mut varlena = false;
            // SAFETY: a catalog look-up for an existing type; the FmgrInfo lives in `mcxt`.
            unsafe {
                pg_sys::getTypeOutputInfo(typ, &mut func, &mut varlena);
                fmgr(mcxt, func, None)
            }
        };
        match typ {
            pg_sys::INT2OID | pg_sys::INT4OID | pg_sys::INT8OID => ToJson::Integer(output()),
            pg_sys::NUMERICOID => ToJson::Numeric(output()),
            pg_sys::BOOLOID => ToJson::Bool,
            pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID => ToJson::Text(output()),
            // SAFETY: as above.
            _ => ToJson::ToJsonb(unsafe { fmgr(mcxt, to_jsonb, Some(typ)) }),
        }
    }

    /// SAFETY: `value` is a non-NULL datum of the type this was made for.
    unsafe fn json(&self, setup: &Setup, value: pg_sys::Datum) -> String {
        // SAFETY: the output function set up for the value's type.
        let out = |f: *mut pg_sys::FmgrInfo| unsafe { output(f, value) };
        match self {
            ToJson::Integer(f) => out(*f),
            ToJson::Numeric(f) => {
                let text = out(*f);
                if text.bytes().any(|b| b.is_ascii_alphabetic()) {
                    json_string(&text) // NaN, Infinity, -Infinity
                } else {
                    text
                }
            }
            ToJson::Bool => if value.value() != 0 { "true" } else { "false" }.to_string(),
            ToJson::Text(f) => json_string(&out(*f)),
            ToJson::ToJsonb(f) => {
                // SAFETY: to_jsonb set up with this column's type; jsonb_out on its result.
                unsafe {
                    let jb = pg_sys::FunctionCall1Coll(*f, pg_sys::InvalidOid, value);
                    output(setup.jsonb_out, jb)
                }
            }
        }
    }
}

/// A value's text through an output function (`f` set up for its type).
/// SAFETY: `value` is a non-NULL datum of the type `f` outputs.
unsafe fn output(f: *mut pg_sys::FmgrInfo, value: pg_sys::Datum) -> String {
    // SAFETY: output functions return a palloc'd C string.
    unsafe { cstring(pg_sys::OutputFunctionCall(f, value)) }
}

/// SAFETY: `s` is a NUL-terminated C string.
unsafe fn cstring(s: *const std::ffi::c_char) -> String {
    // SAFETY: as the caller promises.
    unsafe { CStr::from_ptr(s).to_string_lossy().into_owned() }
}

/// Everything the trigger works out once per statement (kept in the function's `fn_extra`).
struct Setup {
    template: Template,
    fills: Vec<Fill>,
    qos: i16,
    retain: bool,
    broker_id: i32,
    /// Columns the payload carries, by index, with their names as JSON strings.
    payload: Vec<(usize, String)>,
    /// With a column list: the indexes (in `payload`) of the listed columns.
    watched: Option<Vec<usize>>,
    schema: String,
    table: String,
    /// `{"op": ..., "schema": ..., "table": ...` without the op.
    head: String,
    /// How each column of the descriptor becomes JSON (None: not needed).
    to_json: Vec<Option<ToJson>>,
    /// How each column a placeholder names becomes text.
    output: Vec<Option<ToText>>,
    jsonb_out: *mut pg_sys::FmgrInfo,
    /// mqtt_outbox_id_seq, for taking each message's outbox id when it is queued.
    outbox_seq: pg_sys::Oid,
}

fn bad(message: String, hint: Option<&str>) -> ! {
    errors::raise(INVALID_PARAMETER, message, hint)
}

/// Trigger arguments as strings.
///
/// SAFETY: `trigger` is the trigger manager's Trigger of this call.
unsafe fn trigger_args(trigger: *const pg_sys::Trigger) -> Vec<String> {
    let n = unsafe { (*trigger).tgnargs } as usize;
    (0..n)
        .map(|i| {
            // SAFETY: tgargs holds tgnargs NUL-terminated strings.
            unsafe { CStr::from_ptr(*(*trigger).tgargs.add(i)) }
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Parse qos and retain trigger arguments.
fn parse_qos(s: &str) -> i16 {
    match s.trim() {
        "0" => 0,
        "1" => 1,
        "2" => 2,
        other => bad(
            format!("invalid qos \"{other}\" in the arguments of mqtt_publish_trigger: must be 0, 1 or 2"),
            Some("The second trigger argument is the QoS: '0', '1' or '2'."),
        ),
    }
}

fn parse_retain(s: &str) -> bool {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "t" | "on" | "yes" | "1" => true,
        "false" | "f" | "off" | "no" | "0" | "" => false,
        other => bad(
            format!("invalid retain \"{other}\" in the arguments of mqtt_publish_trigger: must be true or false"),
            Some("The third trigger argument is retain: 'true' or 'false'."),
        ),
    }
}

/// The columns of a relation, by index: (name, type, dropped).
fn columns(rel: &PgRelation) -> Vec<(String, pg_sys::Oid, bool)> {
    let desc = rel.tuple_desc();
    (0..desc.len())
        .filter_map(|i| desc.get(i))
        .map(|a| (a.name().to_string(), a.type_oid().value(), a.is_dropped()))
        .collect()
}

/// Parse a template and match its placeholders to the relation's columns.
fn template_fills(
    text: &str,
    cols: &[(String, pg_sys::Oid, bool)],
    table: &str,
) -> (Template, Vec<Fill>) {
    let template = Template::parse(text).unwrap_or_else(|e| {
        bad(
            format!("invalid MQTT topic template \"{text}\": {e}"),
            Some("Placeholders are {schema}, {table}, {op} and {<column>}; the rest must be a valid topic name without + or #."),
        )
    });
    let fills = template
        .placeholders()
        .map(|name| match name {
            "schema" => Fill::Schema,
            "table" => Fill::Table,
            "op" => Fill::Op,
            column => Fill::Column(
                cols.iter()
                    .position(|(n, _, dropped)| n == column && !dropped)
                    .unwrap_or_else(|| {
                        bad(
                            format!("topic template \"{text}\" names {{{column}}}, which is not a column of table {table}"),
                            Some("Column names in {...} are exact and case-sensitive."),
                        )
                    }),
            ),
        })
        .collect();
    (template, fills)
}

/// Indexes of the primary key's columns.
fn primary_key(relid: pg_sys::Oid) -> Vec<i16> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT a.attnum FROM pg_catalog.pg_index i \
                 JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid \
                   AND a.attnum OPERATOR(pg_catalog.=) ANY (i.indkey) \
                 WHERE i.indrelid OPERATOR(pg_catalog.=) $1 AND i.indisprimary ORDER BY a.attnum",
                None,
                &[relid.into()],
            )
            .map(|rows| {
                rows.filter_map(|r| r.get::<i16>(1).ok().flatten())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// A function's FmgrInfo, allocated in `mcxt`. With `arg_type`, the call also gets an
/// expression saying its argument's type, which polymorphic functions (to_jsonb) read.
///
/// SAFETY: must be called with a valid memory context that outlives the use of the result.
unsafe fn fmgr(
    mcxt: pg_sys::MemoryContext,
    func: pg_sys::Oid,
    arg_type: Option<pg_sys::Oid>,
) -> *mut pg_sys::FmgrInfo {
    unsafe {
        let info =
            pg_sys::MemoryContextAllocZero(mcxt, std::mem::size_of::<pg_sys::FmgrInfo>()).cast();
        pg_sys::fmgr_info_cxt(func, info, mcxt);
        if let Some(t) = arg_type {
            PgMemoryContexts::For(mcxt).switch_to(|_| {
                let arg = pg_sys::makeNullConst(t, -1, pg_sys::InvalidOid);
                let args = pg_sys::lappend(std::ptr::null_mut(), arg.cast());
                let expr = pg_sys::makeFuncExpr(
                    func,
                    pg_sys::JSONBOID,
                    args,
                    pg_sys::InvalidOid,
                    pg_sys::InvalidOid,
                    pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
                );
                (*info).fn_expr = expr.cast();
            });
        }
        info
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

impl Setup {
    /// SAFETY: `td` is the trigger manager's TriggerData; `mcxt` lives for the statement.
    unsafe fn new(td: *const pg_sys::TriggerData, mcxt: pg_sys::MemoryContext) -> Setup {
        let rel = unsafe { PgRelation::from_pg((*td).tg_relation) };
        let args = unsafe { trigger_args((*td).tg_trigger) };
        let table = format!("{}.{}", rel.namespace(), rel.name());
        let Some(text) = args.first() else {
            bad(
                format!("mqtt_publish_trigger on table {table} needs a topic template as its first argument"),
                Some("EXECUTE FUNCTION mqtt_publish_trigger('erp/{table}/{op}/{id}'), or use mqtt_watch_table()."),
            )
        };
        let cols = columns(&rel);
        let (template, fills) = template_fills(text, &cols, &table);
        let qos = args.get(1).map_or(0, |s| parse_qos(s));
        let retain = args.get(2).is_some_and(|s| parse_retain(s));
        let broker_name = args.get(3).filter(|s| !s.is_empty()).cloned();
        let broker_id = broker::id_for_publish(broker_name.as_deref());
        let outbox_seq = catalog::installed_or_raise().outbox_seq;
        let listed: Vec<usize> = args
            .iter()
            .skip(4)
            .map(|name| {
                cols.iter()
                    .position(|(n, _, dropped)| n == name && !dropped)
                    .unwrap_or_else(|| {
                        bad(
                            format!("mqtt_publish_trigger on table {table}: \"{name}\" is not a column of it"),
                            Some("Arguments after the broker are column names, exact and case-sensitive."),
                        )
                    })
            })
            .collect();
        let (payload_idx, watched) = if listed.is_empty() {
            let all: Vec<usize> = (0..cols.len()).filter(|i| !cols[*i].2).collect();
            (all, None)
        } else {
            let mut idx: Vec<usize> = primary_key(rel.oid())
                .into_iter()
                .map(|n| (n - 1) as usize)
                .collect();
            for i in &listed {
                if !idx.contains(i) {
                    idx.push(*i);
                }
            }
            idx.sort_unstable();
            let watched = listed
                .iter()
                .filter_map(|i| idx.iter().position(|j| j == i))
                .collect();
            (idx, Some(watched))
        };
        let to_jsonb_oid = pg_sys::Oid::from(pg_sys::F_TO_JSONB);
        let mut to_json = vec![None; cols.len()];
        for i in &payload_idx {
            // SAFETY: mcxt is the statement's; the FmgrInfo lives as long.
            to_json[*i] = Some(unsafe { ToJson::new(mcxt, to_jsonb_oid, cols[*i].1) });
        }
        let mut output = vec![None; cols.len()];
        for f in &fills {
            if let Fill::Column(i) = f {
                let typ = cols[*i].1;
                let mut cast = pg_sys::InvalidOid;
                // SAFETY: catalog look-ups for a column's existing type; the FmgrInfos live
                // in the statement's context.
                output[*i] = Some(unsafe {
                    let path = pg_sys::find_coercion_pathway(
                        pg_sys::TEXTOID,
                        typ,
                        pg_sys::CoercionContext::COERCION_EXPLICIT,
                        &mut cast,
                    );
                    if path == pg_sys::CoercionPathType::COERCION_PATH_FUNC
                        && cast != pg_sys::InvalidOid
                        && pg_sys::get_func_nargs(cast) == 1
                    {
                        ToText::Cast(fmgr(mcxt, cast, None))
                    } else {
                        let mut func = pg_sys::InvalidOid;
                        let mut varlena = false;
                        pg_sys::getTypeOutputInfo(typ, &mut func, &mut varlena);
                        ToText::Output(fmgr(mcxt, func, None))
                    }
                });
            }
        }
        let head = format!(
            "\"schema\": {}, \"table\": {}",
            json_string(rel.namespace()),
            json_string(rel.name())
        );
        Setup {
            template,
            fills,
            qos,
            retain,
            broker_id,
            payload: payload_idx
                .into_iter()
                .map(|i| (i, json_string(&cols[i].0)))
                .collect(),
            watched,
            schema: rel.namespace().to_string(),
            table: rel.name().to_string(),
            head,
            to_json,
            output,
            // SAFETY: as above.
            jsonb_out: unsafe { fmgr(mcxt, pg_sys::Oid::from(pg_sys::F_JSONB_OUT), None) },
            outbox_seq,
        }
    }
}

/// A tuple's values.
struct Row {
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
}

impl Row {
    /// SAFETY: `tuple` is a valid tuple of `desc`.
    unsafe fn deform(tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc) -> Row {
        let n = unsafe { (*desc).natts } as usize;
        let mut row = Row {
            values: vec![pg_sys::Datum::from(0usize); n],
            nulls: vec![false; n],
        };
        // SAFETY: the arrays have natts entries.
        unsafe {
            pg_sys::heap_deform_tuple(tuple, desc, row.values.as_mut_ptr(), row.nulls.as_mut_ptr())
        };
        row
    }

    /// The payload columns as JSON texts (None for NULL), as to_jsonb gives them.
    fn json(&self, setup: &Setup) -> Vec<Option<String>> {
        setup
            .payload
            .iter()
            .map(|(i, _)| {
                if self.nulls[*i] {
                    return None;
                }
                let how = setup.to_json[*i].as_ref()?;
                // SAFETY: set up for this column's type, called with its value; results are
                // allocated in the per-row context.
                Some(unsafe { how.json(setup, self.values[*i]) })
            })
            .collect()
    }

    /// A column's text form, for a placeholder (None for NULL).
    fn text(&self, setup: &Setup, i: usize) -> Option<String> {
        if self.nulls[i] {
            return None;
        }
        // SAFETY: the column type's cast to text, or its output function, with its value.
        unsafe {
            Some(match setup.output[i]? {
                ToText::Cast(f) => cstring(pg_sys::text_to_cstring(
                    pg_sys::FunctionCall1Coll(f, pg_sys::DEFAULT_COLLATION_OID, self.values[i])
                        .cast_mut_ptr(),
                )),
                ToText::Output(f) => output(f, self.values[i]),
            })
        }
    }
}

fn object(setup: &Setup, values: &[Option<String>]) -> String {
    let mut out = String::from("{");
    for (n, ((_, name), v)) in setup.payload.iter().zip(values).enumerate() {
        if n > 0 {
            out.push_str(", ");
        }
        out.push_str(name);
        out.push_str(": ");
        out.push_str(v.as_deref().unwrap_or("null"));
    }
    out.push('}');
    out
}

/// `mqtt_publish_trigger()`: see the module documentation.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn mqtt_publish_trigger(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: the function manager's call info; the trigger manager's TriggerData when it is
    // set as the context (checked first).
    unsafe {
        let context = (*fcinfo).context;
        if context.is_null() || !pgrx::is_a(context, pg_sys::NodeTag::T_TriggerData) {
            errors::raise(
                pgrx::PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
                "mqtt_publish_trigger() was not called by the trigger manager",
                None,
            );
        }
        let td = context as *const pg_sys::TriggerData;
        let event = (*td).tg_event;
        if event & pg_sys::TRIGGER_EVENT_ROW == 0
            || event & pg_sys::TRIGGER_EVENT_TIMINGMASK != pg_sys::TRIGGER_EVENT_AFTER
        {
            bad(
                "mqtt_publish_trigger() must be an AFTER ... FOR EACH ROW trigger".into(),
                Some("CREATE TRIGGER ... AFTER INSERT OR UPDATE OR DELETE ON tbl FOR EACH ROW EXECUTE FUNCTION mqtt_publish_trigger('...'), or use mqtt_watch_table()."),
            );
        }
        let flinfo = (*fcinfo).flinfo;
        if (*flinfo).fn_extra.is_null() {
            let mcxt = (*flinfo).fn_mcxt;
            let setup = Setup::new(td, mcxt);
            (*flinfo).fn_extra = PgMemoryContexts::For(mcxt)
                .leak_and_drop_on_delete(setup)
                .cast();
        }
        let setup = &*((*flinfo).fn_extra as *const Setup);
        let desc = (*(*td).tg_relation).rd_att;
        let (op, new, old) = match event & pg_sys::TRIGGER_EVENT_OPMASK {
            pg_sys::TRIGGER_EVENT_INSERT => ("insert", Some((*td).tg_trigtuple), None),
            pg_sys::TRIGGER_EVENT_DELETE => ("delete", None, Some((*td).tg_trigtuple)),
            pg_sys::TRIGGER_EVENT_UPDATE => {
                ("update", Some((*td).tg_newtuple), Some((*td).tg_trigtuple))
            }
            _ => return pg_sys::Datum::from(0usize),
        };
        let new = new.map(|t| Row::deform(t, desc));
        let old = old.map(|t| Row::deform(t, desc));
        publish_row(setup, op, new.as_ref(), old.as_ref());
        pg_sys::Datum::from(0usize)
    }
}

fn publish_row(setup: &Setup, op: &str, new: Option<&Row>, old: Option<&Row>) {
    let new_json = new.map(|r| r.json(setup));
    let old_json = old.map(|r| r.json(setup));
    if let (Some(watched), Some(n), Some(o)) = (&setup.watched, &new_json, &old_json) {
        if watched.iter().all(|i| n[*i] == o[*i]) {
            return; // none of the watched columns changed
        }
    }
    let source = new.or(old).expect("a row trigger has a row");
    let mut fills = setup.fills.iter();
    let topic = setup.template.fill(|_| match fills.next() {
        Some(Fill::Schema) => Some(setup.schema.clone()),
        Some(Fill::Table) => Some(setup.table.clone()),
        Some(Fill::Op) => Some(op.to_string()),
        Some(Fill::Column(i)) => source.text(setup, *i),
        None => None,
    });
    if let Err(e) = mqtt_pg_core::topic::validate_topic(&topic) {
        errors::bad_topic("topic", &topic, &e);
    }
    let payload = format!(
        "{{\"op\": \"{op}\", {}, \"new\": {}, \"old\": {}}}",
        setup.head,
        new_json
            .as_ref()
            .map_or("null".into(), |v| object(setup, v)),
        old_json
            .as_ref()
            .map_or("null".into(), |v| object(setup, v)),
    );
    let limit = gucs::max_payload_size();
    if payload.len() > limit {
        errors::raise(
            PROGRAM_LIMIT,
            format!(
                "the change of a row of {}.{} makes an MQTT payload of {} bytes, over mqtt_pg.max_payload_size ({limit} bytes)",
                setup.schema, setup.table, payload.len()
            ),
            Some("Publish fewer columns (the columns argument of mqtt_watch_table), or raise mqtt_pg.max_payload_size."),
        );
    }
    access::require(&topic, Operation::Publish);
    pending::queue(
        setup.outbox_seq,
        setup.broker_id,
        topic,
        payload.into_bytes(),
        setup.qos,
        setup.retain,
        None,
    );
}

#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_mqtt_publish_trigger() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}
