import { useEffect, useState } from 'react';
import {
  Alert, Button, DescriptionList, DescriptionListDescription, DescriptionListGroup, DescriptionListTerm, Label,
  PageSection, Tab, TabTitleText, Tabs, TextArea, Title, Toolbar, ToolbarContent, ToolbarItem, Breadcrumb,
  BreadcrumbItem, Checkbox, FormSelect, FormSelectOption, TextInput,
} from '@patternfly/react-core';
import { Table, Tbody, Td, Th, Thead, Tr } from '@patternfly/react-table';
import * as yaml from 'js-yaml';
import { R, age, get, getText, request, resourcePath, usePermissions, useWatch } from '../api.js';
import {
  ACTION_LABELS, ConfirmModal, ErrorAlert, StatusLabel, allowedActions, condition, migratable, runAction, vmStatus,
} from './common.jsx';
import { ActionDialog } from './VMActions.jsx';
import { SerialConsole, VNCConsole } from './Consoles.jsx';
import { SchedulingSection } from './Scheduling.jsx';

const TABS = ['overview', 'configuration', 'yaml', 'events', 'console', 'diagnostics'];
const TAB_TITLES = {
  overview: 'Overview', configuration: 'Configuration', yaml: 'YAML', events: 'Events', console: 'Console',
  diagnostics: 'Diagnostics',
};

function DL({ items }) {
  return (
    <DescriptionList isHorizontal isCompact>
      {items.map(([k, v]) => (
        <DescriptionListGroup key={k}>
          <DescriptionListTerm>{k}</DescriptionListTerm>
          <DescriptionListDescription>{v === undefined || v === null || v === '' ? '—' : v}</DescriptionListDescription>
        </DescriptionListGroup>
      ))}
    </DescriptionList>
  );
}

function SimpleTable({ label, columns, rows }) {
  return (
    <Table aria-label={label} variant="compact">
      <Thead><Tr>{columns.map((c) => <Th key={c}>{c}</Th>)}</Tr></Thead>
      <Tbody>
        {rows.length === 0 && <Tr><Td colSpan={columns.length}>None</Td></Tr>}
        {rows.map((r, i) => <Tr key={i}>{r.map((c, j) => <Td key={j} dataLabel={columns[j]}>{c}</Td>)}</Tr>)}
      </Tbody>
    </Table>
  );
}

function OverviewTab({ vm, vmi }) {
  const tmpl = (vm.spec.template && vm.spec.template.spec) || {};
  const domain = tmpl.domain || {};
  const cpu = domain.cpu || {};
  const status = (vmi && vmi.status) || {};
  const disks = (domain.devices && domain.devices.disks) || [];
  const volumes = new Map((tmpl.volumes || []).map((v) => [v.name, v]));
  const nics = (domain.devices && domain.devices.interfaces) || [];
  const ifStatus = new Map((status.interfaces || []).map((i) => [i.name, i]));
  const src = (v) => {
    if (!v) return '';
    const kind = Object.keys(v).find((k) => k !== 'name');
    const body = v[kind] || {};
    return `${kind}${body.image ? `: ${body.image}` : body.name ? `: ${body.name}` : body.claimName ? `: ${body.claimName}` : ''}`;
  };
  return (
    <>
      <DL items={[
        ['Name', vm.metadata.name], ['Namespace', vm.metadata.namespace], ['Status', <StatusLabel status={vmStatus(vm)} />],
        ['Created', `${vm.metadata.creationTimestamp} (${age(vm.metadata.creationTimestamp)} ago)`],
        ['Node', status.nodeName], ['Run strategy', vm.spec.runStrategy || (vm.spec.running ? 'Always' : 'Halted')],
        ['CPU', `${(cpu.cores || 1) * (cpu.sockets || 1) * (cpu.threads || 1)} vCPU`],
        ['Memory', (domain.memory && domain.memory.guest) || (domain.resources && domain.resources.requests && domain.resources.requests.memory)],
        ['Labels', Object.entries(vm.metadata.labels || {}).map(([k, v]) => <Label key={k} isCompact>{k}={v}</Label>)],
        ['Guest OS', status.guestOSInfo && (status.guestOSInfo.prettyName || status.guestOSInfo.name)],
      ]} />
      <Title headingLevel="h3" style={{ marginTop: 16 }}>Disks</Title>
      <SimpleTable label="Disks" columns={['Name', 'Bus', 'Source']}
        rows={disks.map((d) => [d.name, (d.disk && d.disk.bus) || (d.cdrom && 'cdrom') || '', src(volumes.get(d.name))])} />
      <Title headingLevel="h3" style={{ marginTop: 16 }}>Network interfaces</Title>
      <SimpleTable label="Network interfaces" columns={['Name', 'Binding', 'MAC', 'IP addresses']}
        rows={nics.map((n) => {
          const s = ifStatus.get(n.name) || {};
          return [n.name, Object.keys(n).find((k) => !['name', 'macAddress', 'model', 'ports'].includes(k)) || '',
            s.mac || n.macAddress || '', (s.ipAddresses || (s.ipAddress ? [s.ipAddress] : [])).join(', ')];
        })} />
    </>
  );
}

// NIC hotplug exactly as `virtctl addinterface`/`removeinterface` do it (virtplane/cli/virtctl.py, api/hotplug.py):
// the VM template's interfaces and networks are replaced by a JSON patch guarded by a resourceVersion test op
// (retried when the VM changed meanwhile); the VM controller then plugs or unplugs the NIC of the running VMI.
// A hot-pluggable NIC is the bridge binding on a multus network; removing one marks it `state: absent`.
class Refused extends Error {}

const ifacesOf = (spec) => ((spec.domain && spec.domain.devices && spec.domain.devices.interfaces) || []);
const networkOf = (spec, n) => (spec.networks || []).find((x) => x.name === n) || {};
const nicHotpluggable = (spec, iface) => {
  const m = networkOf(spec, iface.name).multus;
  return 'bridge' in iface && Boolean(m) && !m.default;
};

function addInterface(spec, iface, network) {
  const n = iface.name;
  if (!n) throw new Refused('an interface to add needs a name');
  if (ifacesOf(spec).some((i) => i.name === n) || (spec.networks || []).some((x) => x.name === n)) {
    throw new Refused(`Unable to add interface [${n}] because an interface or network with that name already exists`);
  }
  spec.domain = spec.domain || {};
  spec.domain.devices = spec.domain.devices || {};
  spec.domain.devices.interfaces = [...ifacesOf(spec), iface];
  spec.networks = [...(spec.networks || []), network];
}

function removeInterface(spec, n) {
  const iface = ifacesOf(spec).find((i) => i.name === n);
  if (!iface) throw new Refused(`Unable to remove interface [${n}] because it does not exist`);
  if (!nicHotpluggable(spec, iface)) {
    throw new Refused(`Unable to remove interface [${n}]: only an interface with the bridge binding on a secondary (multus) network can be unplugged`);
  }
  iface.state = 'absent';
}

async function editInterfaces(namespace, name, edit) {
  const path = resourcePath(R.vms, namespace, name);
  for (let attempt = 0; attempt < 5; attempt++) {
    const vm = await get(path);
    const spec = JSON.parse(JSON.stringify((vm.spec.template && vm.spec.template.spec) || {}));
    edit(spec);
    const ops = [
      { op: 'test', path: '/metadata/resourceVersion', value: vm.metadata.resourceVersion },
      { op: 'add', path: '/spec/template/spec/domain/devices/interfaces', value: spec.domain.devices.interfaces },
      { op: 'add', path: '/spec/template/spec/networks', value: spec.networks || [] },
    ];
    try {
      await request('PATCH', path, ops, 'application/json-patch+json');
      return;
    } catch (e) {
      if (e.code === 409 || (e.code === 422 && /test/i.test(e.message))) continue; // changed meanwhile: read again
      throw e;
    }
  }
  throw new Refused(`${name} kept changing while the interface was being edited; try again`);
}

function NICSection({ vm, vmi }) {
  const { namespace, name } = vm.metadata;
  const nads = useWatch(R.nads, { namespace });
  const [nicName, setNicName] = useState('');
  const [nad, setNad] = useState('');
  const [error, setError] = useState(null);
  const [done, setDone] = useState('');
  const spec = (vm.spec.template && vm.spec.template.spec) || {};
  const status = new Map(((vmi && vmi.status && vmi.status.interfaces) || []).map((i) => [i.name, i]));
  const run = async (what, edit) => {
    setError(null); setDone('');
    try {
      await editInterfaces(namespace, name, edit);
      setDone(what);
      return true;
    } catch (e) {
      setError(e instanceof Refused ? { message: e.message, causes: [] } : e);
      return false;
    }
  };
  const add = async () => {
    const n = nicName.trim();
    const ok = await run(`Requested: add interface ${n} on ${nad}`,
      (s) => addInterface(s, { name: n, bridge: {} }, { name: n, multus: { networkName: nad } }));
    if (ok) setNicName('');
  };
  const network = (n) => {
    const net = networkOf(spec, n);
    return net.pod ? 'pod network' : net.multus ? `multus: ${net.multus.networkName}` : Object.keys(net).filter((k) => k !== 'name').join(',');
  };
  return (
    <>
      <Title headingLevel="h3" style={{ marginTop: 24 }}>Network interfaces</Title>
      <ErrorAlert error={error} title="The request was refused" onClose={() => setError(null)} />
      {done && <Alert variant="info" isInline title={done} data-testid="nic-done" />}
      <SimpleTable label="Configured network interfaces" columns={['Name', 'Binding', 'Network', 'State', 'MAC', 'IP addresses', '']}
        rows={ifacesOf(spec).map((i) => {
          const st = status.get(i.name) || {};
          const binding = Object.keys(i).find((k) => !['name', 'macAddress', 'model', 'ports', 'state', 'pciAddress', 'bootOrder'].includes(k)) || '';
          const absent = i.state === 'absent';
          return [i.name, binding, network(i.name), absent ? 'absent (unplug requested)' : (st.name ? 'attached' : ''),
            st.mac || i.macAddress || '', (st.ipAddresses || (st.ipAddress ? [st.ipAddress] : [])).join(', '),
            nicHotpluggable(spec, i) && !absent ? (
              <Button variant="link" isDanger data-remove-nic={i.name}
                onClick={() => run(`Requested: remove interface ${i.name}`, (s) => removeInterface(s, i.name))}>Remove</Button>) : ''];
        })} />
      <Title headingLevel="h4" style={{ marginTop: 16 }}>Add a network interface (bridge binding on a NetworkAttachmentDefinition)</Title>
      <Toolbar><ToolbarContent>
        <ToolbarItem>
          <TextInput value={nicName} onChange={(_e, v) => setNicName(v)} placeholder="Interface name" aria-label="Interface name" />
        </ToolbarItem>
        <ToolbarItem>
          <FormSelect value={nad} onChange={(_e, v) => setNad(v)} aria-label="Network attachment definition">
            <FormSelectOption value="" label={nads.loaded && nads.items.length === 0 ? `No NetworkAttachmentDefinitions in ${namespace}` : 'Choose a NetworkAttachmentDefinition'} isPlaceholder />
            {nads.items.map((d) => <FormSelectOption key={d.metadata.name} value={d.metadata.name} label={d.metadata.name} />)}
          </FormSelect>
        </ToolbarItem>
        <ToolbarItem><Button onClick={add} isDisabled={!nicName.trim() || !nad}>Add network interface</Button></ToolbarItem>
      </ToolbarContent></Toolbar>
    </>
  );
}

// Disk hotplug through KubeVirt's addvolume/removevolume subresources: on the running VMI only, or persisted
// into the VM (then the VM controller carries it to the VMI, and it survives a restart).
function ConfigurationTab({ vm, vmi }) {
  const { namespace, name } = vm.metadata;
  const dvs = useWatch(R.dataVolumes, { namespace });
  const pvcs = useWatch(R.pvcs, { namespace });
  const [source, setSource] = useState('');
  const [bus, setBus] = useState('scsi');
  const [persist, setPersist] = useState(true);
  const [error, setError] = useState(null);
  const [done, setDone] = useState('');
  const running = vmi && vmi.status && vmi.status.phase === 'Running';
  const tmpl = (vm.spec.template && vm.spec.template.spec) || {};
  const vmiVolumes = (vmi && vmi.spec && vmi.spec.volumes) || [];
  const volumes = [...(tmpl.volumes || []), ...vmiVolumes.filter((v) => !(tmpl.volumes || []).some((t) => t.name === v.name))];
  const statusOf = new Map(((vmi && vmi.status && vmi.status.volumeStatus) || []).map((v) => [v.name, v]));
  const hot = (v) => Boolean((v.dataVolume && v.dataVolume.hotpluggable) || (v.persistentVolumeClaim && v.persistentVolumeClaim.hotpluggable));
  const used = new Set(volumes.map((v) => (v.dataVolume && v.dataVolume.name) || (v.persistentVolumeClaim && v.persistentVolumeClaim.claimName)));
  const choices = [
    ...dvs.items.map((d) => ['dv', d.metadata.name]),
    ...pvcs.items.filter((p) => !dvs.items.some((d) => d.metadata.name === p.metadata.name)).map((p) => ['pvc', p.metadata.name]),
  ].filter(([, n]) => !used.has(n));
  const sub = (target, action, body) => request('PUT',
    `/apis/subresources.kubevirt.io/v1/namespaces/${namespace}/${target}/${name}/${action}`, body);
  const add = async () => {
    setError(null); setDone('');
    const [kind, claim] = source.split('/');
    const volumeSource = kind === 'dv' ? { dataVolume: { name: claim, hotpluggable: true } }
      : { persistentVolumeClaim: { claimName: claim, hotpluggable: true } };
    try {
      await sub(persist ? 'virtualmachines' : 'virtualmachineinstances', 'addvolume',
        { name: claim, disk: { disk: { bus } }, volumeSource });
      setDone(`Requested: add ${claim}`); setSource('');
    } catch (e) { setError(e); }
  };
  const remove = async (vol) => {
    setError(null); setDone('');
    const inTemplate = (tmpl.volumes || []).some((t) => t.name === vol);
    try {
      await sub(inTemplate ? 'virtualmachines' : 'virtualmachineinstances', 'removevolume', { name: vol });
      setDone(`Requested: remove ${vol}`);
    } catch (e) { setError(e); }
  };
  return (
    <>
      <Title headingLevel="h3">Disks</Title>
      <ErrorAlert error={error} title="The request was refused" onClose={() => setError(null)} />
      {done && <Alert variant="info" isInline title={done} />}
      <SimpleTable label="Configured disks" columns={['Volume', 'Source', 'Hotplug', 'Phase', '']}
        rows={volumes.map((v) => {
          const kind = Object.keys(v).find((k) => k !== 'name');
          const st = statusOf.get(v.name) || {};
          return [v.name, kind, hot(v) ? 'yes' : '', st.phase || '',
            hot(v) ? <Button variant="link" isDanger onClick={() => remove(v.name)} data-remove={v.name}>Remove</Button> : ''];
        })} />
      <Title headingLevel="h3" style={{ marginTop: 16 }}>Add a disk {running ? '(hot-plugged into the running VM)' : ''}</Title>
      <Toolbar><ToolbarContent>
        <ToolbarItem>
          <FormSelect value={source} onChange={(_e, v) => setSource(v)} aria-label="Volume to add">
            <FormSelectOption value="" label="Choose a DataVolume or PVC" isPlaceholder />
            {choices.map(([k, n]) => <FormSelectOption key={`${k}/${n}`} value={`${k}/${n}`} label={`${n} (${k === 'dv' ? 'DataVolume' : 'PVC'})`} />)}
          </FormSelect>
        </ToolbarItem>
        <ToolbarItem>
          <FormSelect value={bus} onChange={(_e, v) => setBus(v)} aria-label="Bus">
            <FormSelectOption value="scsi" label="scsi" />
            <FormSelectOption value="virtio" label="virtio" />
          </FormSelect>
        </ToolbarItem>
        <ToolbarItem>
          <Checkbox id="persist" label="Persist in the VirtualMachine" isChecked={persist} onChange={(_e, c) => setPersist(c)} />
        </ToolbarItem>
        <ToolbarItem><Button onClick={add} isDisabled={!source}>Add disk</Button></ToolbarItem>
      </ToolbarContent></Toolbar>
      <NICSection vm={vm} vmi={vmi} />
      <SchedulingSection vm={vm} vmi={vmi} />
    </>
  );
}

function YAMLTab({ vm }) {
  const [text, setText] = useState(() => yaml.dump(vm, { noRefs: true, lineWidth: 120 }));
  const [dirty, setDirty] = useState(false);
  const [error, setError] = useState(null);
  const [saved, setSaved] = useState(false);
  useEffect(() => { if (!dirty) setText(yaml.dump(vm, { noRefs: true, lineWidth: 120 })); }, [vm, dirty]);
  const save = async () => {
    setError(null);
    setSaved(false);
    let body;
    try {
      body = yaml.load(text);
    } catch (e) {
      setError({ message: `Invalid YAML: ${e.message}`, causes: [] });
      return;
    }
    try {
      await request('PUT', resourcePath(R.vms, vm.metadata.namespace, vm.metadata.name), body);
      setDirty(false);
      setSaved(true);
    } catch (e) {
      setError(e);
    }
  };
  const reload = () => { setDirty(false); setError(null); setText(yaml.dump(vm, { noRefs: true, lineWidth: 120 })); };
  return (
    <>
      {error && error.code === 409 && (
        <Alert variant="warning" isInline title="This VirtualMachine was changed since you loaded it" data-testid="yaml-conflict"
          actionLinks={<Button variant="link" isInline onClick={reload}>Reload the latest version (drops your edits)</Button>}>
          {error.message}
        </Alert>
      )}
      {error && error.code !== 409 && <ErrorAlert error={error} title="Save failed" />}
      {saved && <Alert variant="success" isInline title="Saved" />}
      <Toolbar><ToolbarContent>
        <ToolbarItem><Button onClick={save} isDisabled={!dirty}>Save</Button></ToolbarItem>
        <ToolbarItem><Button variant="secondary" onClick={reload}>Reload</Button></ToolbarItem>
        {dirty && <ToolbarItem><Label color="orange">Edited</Label></ToolbarItem>}
      </ToolbarContent></Toolbar>
      <TextArea className="vp-yaml" aria-label="YAML" value={text} rows={32} resizeOrientation="vertical"
        onChange={(_e, v) => { setText(v); setDirty(true); }} />
    </>
  );
}

export function EventsTable({ events }) {
  const sorted = [...events].sort((a, b) => String(b.lastTimestamp || b.eventTime || b.metadata.creationTimestamp)
    .localeCompare(String(a.lastTimestamp || a.eventTime || a.metadata.creationTimestamp)));
  return (
    <SimpleTable label="Events" columns={['Type', 'Reason', 'Object', 'Message', 'Count', 'Last seen']}
      rows={sorted.slice(0, 200).map((e) => [
        e.type, e.reason, `${e.involvedObject?.kind || ''}/${e.involvedObject?.name || ''}`, e.message, e.count || 1,
        age(e.lastTimestamp || e.eventTime || e.metadata.creationTimestamp)])} />
  );
}

function EventsTab({ vm }) {
  const ev = useWatch(R.events, { namespace: vm.metadata.namespace, fieldSelector: `involvedObject.name=${vm.metadata.name}` });
  return <><ErrorAlert error={ev.error} /><EventsTable events={ev.items} /></>;
}

function ConsoleTab({ vm, vmi }) {
  if (!vmi || !vmi.status || vmi.status.phase !== 'Running') {
    return <Alert variant="info" isInline title="The consoles are available while the VM is running." />;
  }
  return (
    <div className="vp-consoles">
      <SerialConsole namespace={vm.metadata.namespace} name={vm.metadata.name} />
      <VNCConsole namespace={vm.metadata.namespace} name={vm.metadata.name} />
    </div>
  );
}

function DiagnosticsTab({ vm, vmi }) {
  const [log, setLog] = useState('');
  const [logError, setLogError] = useState(null);
  const running = vmi && vmi.status && vmi.status.phase === 'Running';
  const loadLog = async () => {
    setLogError(null);
    try {
      setLog(await getText(`/apis/subresources.kubevirt.io/v1/namespaces/${vm.metadata.namespace}/virtualmachineinstances/${vm.metadata.name}/consolelog?tail=300`));
    } catch (e) {
      setLogError(e);
    }
  };
  useEffect(() => { if (running) loadLog(); }, [running]); // eslint-disable-line react-hooks/exhaustive-deps
  const conds = (o) => ((o && o.status && o.status.conditions) || []).map((c) => [c.type, c.status, c.reason || '', c.message || '', age(c.lastTransitionTime)]);
  return (
    <>
      <Title headingLevel="h3">VirtualMachine conditions</Title>
      <SimpleTable label="VM conditions" columns={['Type', 'Status', 'Reason', 'Message', 'Changed']} rows={conds(vm)} />
      <Title headingLevel="h3" style={{ marginTop: 16 }}>VirtualMachineInstance conditions</Title>
      <SimpleTable label="VMI conditions" columns={['Type', 'Status', 'Reason', 'Message', 'Changed']} rows={conds(vmi)} />
      <Title headingLevel="h3" style={{ marginTop: 16 }}>Volume status</Title>
      <SimpleTable label="Volume status" columns={['Name', 'Target', 'Phase', 'Reason', 'Message']}
        rows={((vmi && vmi.status && vmi.status.volumeStatus) || []).map((v) => [v.name, v.target || '', v.phase || '', v.reason || '', v.message || ''])} />
      <Title headingLevel="h3" style={{ marginTop: 16 }}>Guest console log</Title>
      <Button variant="secondary" onClick={loadLog} isDisabled={!running}>Refresh</Button>
      <ErrorAlert error={logError} />
      <pre className="vp-log" data-testid="console-log">{log}</pre>
    </>
  );
}

export function VMDetails({ namespace, name, tab }) {
  const vms = useWatch(R.vms, { namespace, name });
  const vmis = useWatch(R.vmis, { namespace, name });
  const vm = vms.items[0];
  const vmi = vmis.items[0];
  const [confirm, setConfirm] = useState(null);
  const [dialog, setDialog] = useState(null);
  const [error, setError] = useState(null);
  const can = usePermissions();
  const allowed = vm ? allowedActions(vm, vmi, can) : {};
  if (!vm) {
    return (
      <PageSection>
        {vms.loaded ? <Alert variant="warning" isInline title={`VirtualMachine ${namespace}/${name} not found`} /> : <p>Loading…</p>}
        <ErrorAlert error={vms.error} />
      </PageSection>
    );
  }
  const rr = condition(vm, 'RestartRequired');
  const restartRequired = rr && rr.status === 'True' ? rr : null;
  const act = async () => {
    try {
      await runAction(confirm, vm);
      if (confirm === 'delete') location.hash = '/vms';
    } catch (e) {
      setError(e);
    }
    setConfirm(null);
  };
  return (
    <PageSection>
      <Breadcrumb><BreadcrumbItem to="#/vms">VirtualMachines</BreadcrumbItem><BreadcrumbItem isActive>{name}</BreadcrumbItem></Breadcrumb>
      <Toolbar><ToolbarContent>
        <ToolbarItem><Title headingLevel="h1">{name}</Title></ToolbarItem>
        <ToolbarItem><StatusLabel status={vmStatus(vm)} /></ToolbarItem>
        {['start', 'stop', 'forcestop', 'restart', 'pause', 'unpause', 'delete'].map((a) => (
          <ToolbarItem key={a}>
            <Button variant={a === 'delete' ? 'danger' : 'secondary'} isDisabled={!allowed[a]} onClick={() => setConfirm(a)}>
              {ACTION_LABELS[a]}
            </Button>
          </ToolbarItem>
        ))}
        {['migrate', 'clone', 'ssh'].map((a) => (
          <ToolbarItem key={a}>
            <Button variant={a === 'ssh' ? 'link' : 'secondary'} isDisabled={!allowed[a]} onClick={() => setDialog(a)}>
              {ACTION_LABELS[a]}
            </Button>
          </ToolbarItem>
        ))}
      </ToolbarContent></Toolbar>
      {vmi && vmi.status && vmi.status.phase === 'Running' && !allowed.migrate && (
        <p className="vp-hint" data-testid="migrate-disabled-reason">Migrate: {migratable(vmi).reason}</p>
      )}
      {restartRequired && (
        <Alert variant="warning" isInline data-testid="restart-required" title="Restart required">
          {restartRequired.message || 'The VM’s configuration changed in a way the running VM cannot take: restart it to apply.'}
        </Alert>
      )}
      <ErrorAlert error={error} onClose={() => setError(null)} />
      <Tabs activeKey={TABS.includes(tab) ? tab : 'overview'} mountOnEnter unmountOnExit
        onSelect={(_e, k) => { location.hash = `/vms/${namespace}/${name}/${k}`; }}>
        {TABS.map((t) => (
          <Tab key={t} eventKey={t} title={<TabTitleText>{TAB_TITLES[t]}</TabTitleText>}>
            <div style={{ paddingTop: 16 }}>
              {t === 'overview' && <OverviewTab vm={vm} vmi={vmi} />}
              {t === 'configuration' && <ConfigurationTab vm={vm} vmi={vmi} />}
              {t === 'yaml' && <YAMLTab vm={vm} />}
              {t === 'events' && <EventsTab vm={vm} />}
              {t === 'console' && <ConsoleTab vm={vm} vmi={vmi} />}
              {t === 'diagnostics' && <DiagnosticsTab vm={vm} vmi={vmi} />}
            </div>
          </Tab>
        ))}
      </Tabs>
      {dialog && <ActionDialog action={dialog} vm={vm} vmi={vmi} onClose={() => setDialog(null)} />}
      {confirm && (
        <ConfirmModal title={`${ACTION_LABELS[confirm]} ${name}?`} body={`${ACTION_LABELS[confirm]} VirtualMachine ${namespace}/${name}.`}
          confirmLabel={ACTION_LABELS[confirm]} danger={confirm === 'delete'} onConfirm={act} onClose={() => setConfirm(null)} />
      )}
    </PageSection>
  );
}
