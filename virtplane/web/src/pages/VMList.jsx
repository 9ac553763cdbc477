import { useEffect, useMemo, useState } from 'react';
import {
  Alert, Button, FormSelect, FormSelectOption, Label, PageSection, Pagination, SearchInput, TextInput, Title,
  Toolbar, ToolbarContent, ToolbarGroup, ToolbarItem,
} from '@patternfly/react-core';
import { ActionsColumn, Table, Tbody, Td, Th, Thead, Tr } from '@patternfly/react-table';
import { R, age, keyOf, usePermissions, useWatch } from '../api.js';
import {
  ACTION_LABELS, ConfirmModal, ErrorAlert, StatusLabel, allowedActions, migratable, runAction, trueConditions, vmStatus,
  vmiIPs,
} from './common.jsx';
import { ActionDialog } from './VMActions.jsx';

const COLUMNS = [
  ['Name', (r) => r.vm.metadata.name],
  ['Namespace', (r) => r.vm.metadata.namespace],
  ['Status', (r) => r.status],
  ['Conditions', (r) => r.conditions.join(',')],
  ['Node', (r) => r.node],
  ['Created', (r) => r.vm.metadata.creationTimestamp || ''],
  ['IP address', (r) => r.ips.join(',')],
  ['CPU', (r) => r.cpu],
  ['Memory', (r) => r.memory],
];

function cpuOf(vm) {
  const d = (vm.spec && vm.spec.template && vm.spec.template.spec && vm.spec.template.spec.domain) || {};
  const c = d.cpu || {};
  return (c.cores || 1) * (c.sockets || 1) * (c.threads || 1);
}

function memoryOf(vm) {
  const d = (vm.spec && vm.spec.template && vm.spec.template.spec && vm.spec.template.spec.domain) || {};
  return (d.memory && d.memory.guest) || (d.resources && d.resources.requests && d.resources.requests.memory) || '';
}

// "app=web,tier" style filter over labels, evaluated here over the watched objects.
function labelFilter(text) {
  const reqs = text.split(',').map((s) => s.trim()).filter(Boolean).map((s) => {
    const [k, v] = s.split('=').map((x) => x.trim());
    return [k, v];
  });
  return (labels) => reqs.every(([k, v]) => (v === undefined ? k in labels : labels[k] === v));
}

export function VMList() {
  // A user who may not list VMs in every namespace (RBAC) gets one namespace's, chosen in the namespace filter.
  const [scope, setScope] = useState(undefined);
  const vms = useWatch(R.vms, { namespace: scope });
  const vmis = useWatch(R.vmis, { namespace: scope });
  useEffect(() => {
    if (scope === undefined && vms.error && vms.error.code === 403) setScope('default');
  }, [vms.error, scope]);
  const can = usePermissions();
  const [search, setSearch] = useState('');
  const [ns, setNs] = useState('');
  const [status, setStatus] = useState('');
  const [labels, setLabels] = useState('');
  const [sort, setSort] = useState({ index: 0, direction: 'asc' });
  const [page, setPage] = useState(1);
  const [perPage, setPerPage] = useState(50);
  const [selected, setSelected] = useState(new Set());
  const [confirm, setConfirm] = useState(null); // {action, targets}
  const [dialog, setDialog] = useState(null); // {action, key}: migrate, clone, ssh
  const [result, setResult] = useState(null);

  const vmiByKey = useMemo(() => new Map(vmis.items.map((v) => [keyOf(v), v])), [vmis.items]);
  const rows = useMemo(() => vms.items.map((vm) => {
    const vmi = vmiByKey.get(keyOf(vm));
    return {
      key: keyOf(vm), vm, vmi, status: vmStatus(vm), conditions: trueConditions(vm),
      node: (vmi && vmi.status && vmi.status.nodeName) || '', ips: vmiIPs(vmi), cpu: cpuOf(vm), memory: memoryOf(vm),
    };
  }), [vms.items, vmiByKey]);

  const namespaces = useMemo(() => [...new Set([...rows.map((r) => r.vm.metadata.namespace), ...(scope ? [scope] : [])])].sort(),
    [rows, scope]);
  const statuses = useMemo(() => [...new Set(rows.map((r) => r.status))].sort(), [rows]);

  const filtered = useMemo(() => {
    const q = search.trim().toLowerCase();
    const lf = labelFilter(labels);
    const out = rows.filter((r) => (!ns || r.vm.metadata.namespace === ns) && (!status || r.status === status)
      && (!q || r.vm.metadata.name.toLowerCase().includes(q) || r.ips.some((ip) => ip.includes(q)))
      && lf(r.vm.metadata.labels || {}));
    const get = COLUMNS[sort.index][1];
    const dir = sort.direction === 'asc' ? 1 : -1;
    out.sort((a, b) => {
      const x = get(a); const y = get(b);
      const c = typeof x === 'number' ? x - y : String(x).localeCompare(String(y), undefined, { numeric: true });
      return c * dir || a.key.localeCompare(b.key);
    });
    return out;
  }, [rows, search, ns, status, labels, sort]);

  const pageRows = filtered.slice((page - 1) * perPage, page * perPage);
  const selectedRows = rows.filter((r) => selected.has(r.key));
  const toggle = (key, on) => setSelected((s) => { const n = new Set(s); if (on) n.add(key); else n.delete(key); return n; });
  const allOnPage = pageRows.length > 0 && pageRows.every((r) => selected.has(r.key));

  const ask = (action, targets) => setConfirm({ action, targets: targets.filter((r) => allowedActions(r.vm, r.vmi, can)[action]) });
  const perform = async () => {
    const { action, targets } = confirm;
    const outcomes = await Promise.allSettled(targets.map((r) => runAction(action, r.vm)));
    const failed = outcomes.map((o, i) => [o, targets[i]]).filter(([o]) => o.status === 'rejected');
    setResult({
      action, ok: targets.length - failed.length,
      failed: failed.map(([o, r]) => `${r.vm.metadata.name}: ${o.reason.message}`),
    });
    setSelected(new Set());
    setConfirm(null);
  };

  const bulk = (action) => {
    const n = selectedRows.filter((r) => allowedActions(r.vm, r.vmi, can)[action]).length;
    return (
      <ToolbarItem key={action}>
        <Button variant={action === 'delete' ? 'danger' : 'secondary'} isDisabled={n === 0}
          onClick={() => ask(action, selectedRows)} data-action={`bulk-${action}`}>
          {ACTION_LABELS[action]}{n ? ` (${n})` : ''}
        </Button>
      </ToolbarItem>
    );
  };

  return (
    <PageSection>
      <Title headingLevel="h1">VirtualMachines</Title>
      <ErrorAlert error={vms.error} title="Cannot list VirtualMachines" />
      {result && (
        <Alert isInline variant={result.failed.length ? 'warning' : 'success'} data-testid="bulk-result"
          title={`${ACTION_LABELS[result.action]}: ${result.ok} succeeded${result.failed.length ? `, ${result.failed.length} failed` : ''}`}
          actionClose={<Button variant="plain" onClick={() => setResult(null)} aria-label="Close">×</Button>}>
          {result.failed.length > 0 && <ul>{result.failed.map((f) => <li key={f}>{f}</li>)}</ul>}
        </Alert>
      )}
      <Toolbar>
        <ToolbarContent>
          <ToolbarItem>
            <SearchInput placeholder="Search by name or IP" value={search} aria-label="Search by name or IP"
              onChange={(_e, v) => { setSearch(v); setPage(1); }} onClear={() => setSearch('')} />
          </ToolbarItem>
          <ToolbarItem>
            <FormSelect value={scope || ns} onChange={(_e, v) => { if (scope) setScope(v || 'default'); setNs(v); setPage(1); }} aria-label="Namespace">
              {!scope && <FormSelectOption value="" label="All namespaces" />}
              {namespaces.map((n) => <FormSelectOption key={n} value={n} label={n} />)}
            </FormSelect>
          </ToolbarItem>
          <ToolbarItem>
            <FormSelect value={status} onChange={(_e, v) => { setStatus(v); setPage(1); }} aria-label="Status">
              <FormSelectOption value="" label="Any status" />
              {statuses.map((s) => <FormSelectOption key={s} value={s} label={s} />)}
            </FormSelect>
          </ToolbarItem>
          <ToolbarItem>
            <TextInput value={labels} placeholder="Labels: app=web,tier" aria-label="Label filter"
              onChange={(_e, v) => { setLabels(v); setPage(1); }} />
          </ToolbarItem>
          <ToolbarGroup>
            {['start', 'stop', 'restart', 'delete'].map(bulk)}
          </ToolbarGroup>
          <ToolbarItem>
            <Button variant="primary" component="a" href="#/vms/~new" data-testid="create-vm"
              isAriaDisabled={!can(ns || 'default', 'create', 'kubevirt.io', 'virtualmachines')}>Create VirtualMachine</Button>
          </ToolbarItem>
          <ToolbarItem>
            <span data-testid="vm-count" data-count={filtered.length} data-total={rows.length}>
              {filtered.length === rows.length ? `${rows.length} VMs` : `${filtered.length} of ${rows.length} VMs`}
            </span>
          </ToolbarItem>
          <ToolbarItem variant="pagination">
            <Pagination itemCount={filtered.length} page={page} perPage={perPage} isCompact
              onSetPage={(_e, p) => setPage(p)} onPerPageSelect={(_e, pp) => { setPerPage(pp); setPage(1); }} />
          </ToolbarItem>
        </ToolbarContent>
      </Toolbar>
      {!vms.loaded && !vms.error && <p>Loading…</p>}
      <Table aria-label="VirtualMachines" variant="compact" data-testid="vm-table">
        <Thead>
          <Tr>
            <Th select={{ onSelect: (_e, on) => pageRows.forEach((r) => toggle(r.key, on)), isSelected: allOnPage }}
              aria-label="Select all on this page" />
            {COLUMNS.map(([label], i) => (
              <Th key={label} modifier="nowrap" sort={{ sortBy: { index: sort.index, direction: sort.direction }, columnIndex: i,
                onSort: (_e, index, direction) => setSort({ index, direction }) }}>{label}</Th>
            ))}
            <Th screenReaderText="Actions" />
          </Tr>
        </Thead>
        <Tbody>
          {pageRows.map((r, rowIndex) => {
            const allowed = allowedActions(r.vm, r.vmi, can);
            const { namespace, name } = r.vm.metadata;
            return (
              <Tr key={r.key} data-vm={name} data-status={r.status}>
                <Td select={{ rowIndex, onSelect: (_e, on) => toggle(r.key, on), isSelected: selected.has(r.key) }} />
                <Td dataLabel="Name"><a href={`#/vms/${namespace}/${name}`}>{name}</a></Td>
                <Td dataLabel="Namespace">{namespace}</Td>
                <Td dataLabel="Status"><StatusLabel status={r.status} /></Td>
                <Td dataLabel="Conditions">{r.conditions.map((c) => <Label key={c} isCompact>{c}</Label>)}</Td>
                <Td dataLabel="Node">{r.node}</Td>
                <Td dataLabel="Created" title={r.vm.metadata.creationTimestamp}>{age(r.vm.metadata.creationTimestamp)}</Td>
                <Td dataLabel="IP address">{r.ips.join(', ')}</Td>
                <Td dataLabel="CPU">{r.cpu}</Td>
                <Td dataLabel="Memory">{r.memory}</Td>
                <Td isActionCell>
                  <ActionsColumn items={[
                    ...['start', 'stop', 'forcestop', 'restart', 'pause', 'unpause', 'delete'].map((a) => ({
                      title: ACTION_LABELS[a], isDisabled: !allowed[a], onClick: () => ask(a, [r]),
                    })),
                    { isSeparator: true },
                    { title: ACTION_LABELS.migrate, isDisabled: !allowed.migrate, onClick: () => setDialog({ action: 'migrate', key: r.key }),
                      description: !allowed.migrate && r.vmi ? migratable(r.vmi).reason : undefined },
                    { title: ACTION_LABELS.clone, isDisabled: !allowed.clone, onClick: () => setDialog({ action: 'clone', key: r.key }) },
                    { title: 'Open console', isDisabled: !allowed.console,
                      onClick: () => { location.hash = `/vms/${namespace}/${name}/console`; } },
                    { title: ACTION_LABELS.ssh, onClick: () => setDialog({ action: 'ssh', key: r.key }) },
                  ]} />
                </Td>
              </Tr>
            );
          })}
        </Tbody>
      </Table>
      {vms.loaded && filtered.length === 0 && <p style={{ padding: 16 }}>No VirtualMachines match.</p>}
      {dialog && rows.find((r) => r.key === dialog.key) && (() => {
        const r = rows.find((x) => x.key === dialog.key);
        return <ActionDialog action={dialog.action} vm={r.vm} vmi={r.vmi} onClose={() => setDialog(null)} />;
      })()}
      {confirm && (
        <ConfirmModal
          title={`${ACTION_LABELS[confirm.action]} ${confirm.targets.length} VirtualMachine${confirm.targets.length === 1 ? '' : 's'}?`}
          body={<ul>{confirm.targets.slice(0, 20).map((r) => <li key={r.key}>{r.key}</li>)}
            {confirm.targets.length > 20 && <li>… and {confirm.targets.length - 20} more</li>}</ul>}
          confirmLabel={ACTION_LABELS[confirm.action]} danger={confirm.action === 'delete'}
          onConfirm={perform} onClose={() => setConfirm(null)} />
      )}
    </PageSection>
  );
}
