import { useEffect, useState } from 'react';
import {
  Alert, Button, Form, FormGroup, Masthead, MastheadBrand, MastheadContent, MastheadMain, Nav, NavItem,
  NavList, Page, PageSection, PageSidebar, PageSidebarBody, TextInput, Title, Card, CardBody, CardTitle,
  HelperText, HelperTextItem, FormHelperText, ActionGroup,
} from '@patternfly/react-core';
import { getToken, onLoggedOut, request, setToken } from './api.js';
import { VMList } from './pages/VMList.jsx';
import { VMDetails } from './pages/VMDetails.jsx';
import { CreateVM } from './pages/CreateVM.jsx';
import { Overview } from './pages/Overview.jsx';
import { Migrations, Nodes, Pods, Storage } from './pages/Lists.jsx';

// Routes live in the URL fragment (#/vms/ns/name) so the server only ever serves index.html and assets.
function useHash() {
  const [hash, setHash] = useState(location.hash.slice(1) || '/vms');
  useEffect(() => {
    const on = () => setHash(location.hash.slice(1) || '/vms');
    window.addEventListener('hashchange', on);
    return () => window.removeEventListener('hashchange', on);
  }, []);
  return hash;
}

export const navigate = (path) => { location.hash = path; };

function Login({ onLogin }) {
  const [token, setTok] = useState('');
  const [error, setError] = useState('');
  const [busy, setBusy] = useState(false);
  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    setError('');
    setToken(token.trim());
    try {
      // a request that needs a valid token and nothing more (any authenticated user may ask who they are)
      await request('POST', '/apis/authentication.k8s.io/v1/selfsubjectreviews',
        { apiVersion: 'authentication.k8s.io/v1', kind: 'SelfSubjectReview' });
      onLogin();
    } catch (err) {
      setToken('');
      setError(err.code === 401 ? 'The token was not accepted (401 Unauthorized).' : err.message);
    } finally {
      setBusy(false);
    }
  };
  return (
    <PageSection>
      <Card style={{ maxWidth: 560, margin: '64px auto' }}>
        <CardTitle><Title headingLevel="h1">Log in to virtplane</Title></CardTitle>
        <CardBody>
          <Form onSubmit={submit}>
            <FormGroup label="Bearer token" isRequired fieldId="token">
              <TextInput id="token" type="password" value={token} onChange={(_e, v) => setTok(v)}
                validated={error ? 'error' : 'default'} aria-label="Bearer token" />
              <FormHelperText>
                <HelperText>
                  <HelperTextItem variant={error ? 'error' : 'default'}>
                    {error || 'The token from your kubeconfig (users[].user.token).'}
                  </HelperTextItem>
                </HelperText>
              </FormHelperText>
            </FormGroup>
            <ActionGroup>
              <Button type="submit" variant="primary" isDisabled={!token.trim() || busy}>Log in</Button>
            </ActionGroup>
          </Form>
        </CardBody>
      </Card>
    </PageSection>
  );
}

const NAV = [
  ['/overview', 'Overview'],
  ['/vms', 'VirtualMachines'],
  ['/migrations', 'Migrations'],
  ['/storage', 'Storage'],
  ['/nodes', 'Nodes'],
  ['/pods', 'Pods'],
];

function route(hash) {
  const parts = hash.split('?')[0].split('/').filter(Boolean).map(decodeURIComponent);
  switch (parts[0]) {
    case 'overview': return <Overview />;
    case 'vms':
      if (parts[1] === '~new') return <CreateVM />;
      if (parts.length >= 3) return <VMDetails namespace={parts[1]} name={parts[2]} tab={parts[3] || 'overview'} />;
      return <VMList />;
    case 'migrations': return <Migrations />;
    case 'storage': return <Storage />;
    case 'nodes': return <Nodes />;
    case 'pods': return <Pods />;
    default: return <PageSection><Alert variant="warning" isInline title={`No page at ${hash}`} /></PageSection>;
  }
}

export function App() {
  const [loggedIn, setLoggedIn] = useState(Boolean(getToken()));
  const hash = useHash();
  const logout = () => { setToken(''); setLoggedIn(false); };
  useEffect(() => onLoggedOut(() => setLoggedIn(false)), []);
  const masthead = (
    <Masthead>
      <MastheadMain>
        <MastheadBrand>
          <Title headingLevel="h2">virtplane</Title>
        </MastheadBrand>
      </MastheadMain>
      <MastheadContent>
        {loggedIn && <Button variant="secondary" onClick={logout} style={{ marginLeft: 'auto' }}>Log out</Button>}
      </MastheadContent>
    </Masthead>
  );
  if (!loggedIn) return <Page masthead={masthead}><Login onLogin={() => setLoggedIn(true)} /></Page>;
  const active = '/' + (hash.split('/')[1] || 'vms');
  const sidebar = (
    <PageSidebar>
      <PageSidebarBody>
        <Nav aria-label="Main">
          <NavList>
            {NAV.map(([path, label]) => (
              <NavItem key={path} isActive={active === path} to={`#${path}`}>{label}</NavItem>
            ))}
          </NavList>
        </Nav>
      </PageSidebarBody>
    </PageSidebar>
  );
  return <Page masthead={masthead} sidebar={sidebar} isManagedSidebar>{route(hash)}</Page>;
}
